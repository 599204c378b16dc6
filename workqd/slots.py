"""Shared-memory slots: how a worker tells the master what it is doing, at no syscall cost.

The master maps one anonymous shared region before forking; each worker owns one
fixed-size slot in it and writes its state, the message it holds, and its
counters with plain memory stores. The master reads the slots to answer
/metrics, /readyz and STATUS, and after reaping a worker reads its final
counters once, folds them into its own totals and frees the slot. So counters
never go backwards, no gauge outlives its worker, and nothing grows with the
number of restarts. Aligned 8-byte stores are atomic on the platforms Debian
runs workqd on, so a reader sees each field either before or after an update.

Every word has one writer. The master writes a slot's pool and state when it
allocates or frees it; in the worker, the I/O thread writes the connection
state, the draining flag, the tick and the settlement counters, and the
handler thread writes the busy word, the message id, the busy-since time and
the intake counters. The master also writes the paused word (the control
socket's pause/quiet), which the worker's I/O thread only reads. One exception,
still one writer per worker life: when a recycling worker's last task runs
next, the handler thread raises the draining flag as it begins that task, so
the master never sees that worker as leaving while it holds a task not begun.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import mmap
import struct
import threading
import time

from .vocab import OUTCOMES

# Connection states (I/O thread), in the order a worker goes through them.
# Whether a task runs is the separate busy word (handler thread), and draining
# (no new tasks, leaving soon) a separate flag, so no word has two writers.
# PAUSED: connected and declared, consumer cancelled because the master asked (paused word).
# IMPORTING: loading its handler; the master applies the queue's import budget instead
# of the liveness clock, since an import runs no I/O loop that could tick.
# LIMITED: connected and declared, no consumer because the queue's concurrency cap is
# taken by other workers (workqd/worker/limits.py): waiting for a slot is not a fault.
FREE, STARTING, CONNECTING, CONSUMING, PAUSED, IMPORTING, LIMITED = range(7)

# Bits of the limit word (I/O thread): what the worker waits for, what it holds.
WAITS_SLOT, WAITS_TOKEN, HOLDS_SLOT, LEADS_RATE = 1, 2, 4, 8

# 10 ms to 4 h: handlers range from no-ops to batch jobs.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
           120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)

# Slot layout, in 8-byte words.
W_PID, W_STATE, W_POOL, W_BUSY, W_TICK, W_REDELIVERED, W_DURATION_SUM, W_DRAINING = range(8)
W_OUTCOMES = 8                       # len(OUTCOMES) words
W_BUCKETS = W_OUTCOMES + len(OUTCOMES)  # len(BUCKETS) + 1 words (last is +Inf)
W_CONSUMED = W_BUCKETS + len(BUCKETS) + 1
W_SUBSCRIBED = W_CONSUMED + 1        # times the worker started consuming (0 = never yet)
W_BLOCKED = W_SUBSCRIBED + 1         # 1 while the broker blocks the worker's publishing
W_BUSY_SINCE = W_BLOCKED + 1        # monotonic time the running task started (handler thread)
W_PAUSED = W_BUSY_SINCE + 1          # 1: take no tasks (master writes, worker I/O thread reads)
W_WAIT_SUM = W_PAUSED + 1            # queue wait histogram: sum (handler thread)
W_WAIT_BUCKETS = W_WAIT_SUM + 1      # len(BUCKETS) + 1 words (handler thread)
W_LIMIT = W_WAIT_BUCKETS + len(BUCKETS) + 1   # WAITS_*/HOLDS_SLOT/LEADS_RATE bits (I/O thread)
W_LIMIT_WAITED_SLOT = W_LIMIT + 1    # seconds waited for a concurrency slot (I/O thread)
W_LIMIT_WAITED_TOKEN = W_LIMIT + 2   # seconds tasks waited for a rate token (I/O thread)
W_LIMIT_TOKENS = W_LIMIT + 3         # rate tokens taken (I/O thread)
# The held message: its digest identifies it (poison counting), a prefix shows it.
W_MSGID_DIGEST = W_LIMIT_TOKENS + 1  # DIGEST_BYTES bytes (handler thread)
W_MSGID_LEN = W_MSGID_DIGEST + 2     # bytes of the shown prefix
W_MSGID_CUT = W_MSGID_LEN + 1        # bytes of the id left out of the prefix
W_MSGID = W_MSGID_CUT + 1            # MSGID_BYTES bytes: the id's UTF-8, cut on a character
MSGID_BYTES = 120
DIGEST_BYTES = 16
SLOT_WORDS = 96
SLOT_BYTES = SLOT_WORDS * 8
assert W_MSGID * 8 + MSGID_BYTES <= SLOT_BYTES

OUTCOME_WORDS = tuple(range(W_OUTCOMES, W_OUTCOMES + len(OUTCOMES)))
BUCKET_WORDS = tuple(range(W_BUCKETS, W_BUCKETS + len(BUCKETS) + 1))
WAIT_BUCKET_WORDS = tuple(range(W_WAIT_BUCKETS, W_WAIT_BUCKETS + len(BUCKETS) + 1))

# Counters a slot holds, folded into the master's totals when its worker dies.
COUNTER_WORDS = (W_REDELIVERED, W_DURATION_SUM, *range(W_OUTCOMES, W_CONSUMED), W_WAIT_SUM,
                 *WAIT_BUCKET_WORDS, W_LIMIT_WAITED_SLOT, W_LIMIT_WAITED_TOKEN, W_LIMIT_TOKENS)
FLOAT_WORDS = {W_TICK, W_DURATION_SUM, W_BUSY_SINCE, W_WAIT_SUM, W_LIMIT_WAITED_SLOT,
               W_LIMIT_WAITED_TOKEN}
# Slot.counter_values reads COUNTER_WORDS as runs: integers, but for these floats.
assert COUNTER_WORDS == (W_REDELIVERED, W_DURATION_SUM, *range(W_OUTCOMES, W_CONSUMED),
                         W_WAIT_SUM, *range(W_WAIT_BUCKETS, W_LIMIT), W_LIMIT_WAITED_SLOT,
                         W_LIMIT_WAITED_TOKEN, W_LIMIT_TOKENS)
assert FLOAT_WORDS & set(COUNTER_WORDS) == {W_DURATION_SUM, W_WAIT_SUM, W_LIMIT_WAITED_SLOT,
                                            W_LIMIT_WAITED_TOKEN}


# Crash table entries, in 8-byte words: how often a message was held by a worker
# that died, for poison detection on classic queues (quorum queues also have the
# broker's x-delivery-count). A message is known by the digest of its whole id, so
# ids of any length count apart, and what a slot shows of an id plays no part.
C_POOL, C_COUNT, C_LAST_PID, C_STAMP, C_DIGEST = range(5)   # C_DIGEST: DIGEST_BYTES bytes
CRASH_WORDS = C_DIGEST + DIGEST_BYTES // 8
CRASH_ENTRIES = 1024

_WORDS = struct.Struct("@2q")   # a digest as the two native words it is stored in
_blake2b = hashlib.blake2b


# Each delivery's id is digested for its cancel check at intake, again in the handler
# thread and in Slot.begin: the same few ids in a row, so a small cache does it once.
@functools.lru_cache(maxsize=256)
def message_digest(message_id: str) -> bytes:
    """What identifies a message id in the slots and the crash table: a digest of all of
    its UTF-8 (surrogatepass: every str encodes, and no two to the same bytes)."""
    return _blake2b(message_id.encode("utf-8", "surrogatepass"), digest_size=DIGEST_BYTES).digest()


class SlotTable:
    """The shared region: ``capacity`` slots, allocated by the master before any fork,
    followed by the crash table."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        # Anonymous mappings are MAP_SHARED on Linux: children see the same pages.
        # Pages are only backed once touched, so unused slots cost nothing.
        self._crash_base = capacity * SLOT_WORDS
        self._mm = mmap.mmap(-1, (self._crash_base + CRASH_ENTRIES * CRASH_WORDS) * 8)
        self._q = memoryview(self._mm).cast("q")
        self._d = memoryview(self._mm).cast("d")
        self._stamp = 0

    # --- crash table -----------------------------------------------------

    def _crash_entry(self, pool_id: int, digest: bytes) -> int | None:
        q = self._q
        d0, d1 = _WORDS.unpack(digest)
        for i in range(CRASH_ENTRIES):
            b = self._crash_base + i * CRASH_WORDS
            if q[b + C_DIGEST] == d0 and q[b + C_DIGEST + 1] == d1 and q[b + C_POOL] == pool_id:
                return b
        return None

    def record_crash(self, pool_id: int, digest: bytes, pid: int) -> int:
        """Master only: ``pid`` died holding the message whose ``message_digest`` is
        ``digest`` (``Slot.message_digest()``); returns the crash count."""
        q = self._q
        b = self._crash_entry(pool_id, digest)
        self._stamp += 1
        if b is None:
            # Reuse the least recently recorded entry: old crashes age out.
            b = min((self._crash_base + i * CRASH_WORDS for i in range(CRASH_ENTRIES)),
                    key=lambda base: q[base + C_STAMP])
            # Pool 0 first: a worker looking meanwhile never takes the old count for
            # the new message.
            q[b + C_POOL] = 0
            q[b + C_COUNT] = 0
            q[b + C_DIGEST], q[b + C_DIGEST + 1] = _WORDS.unpack(digest)
            q[b + C_POOL] = pool_id
        q[b + C_LAST_PID] = pid
        q[b + C_COUNT] += 1
        q[b + C_STAMP] = self._stamp
        return q[b + C_COUNT]

    def crashes(self, pool_id: int, message_id: str, me: int) -> int:
        """How many workers died holding ``message_id``, counting one whose death the
        master has not recorded yet (its slot still says busy with it)."""
        digest = message_digest(message_id)
        d0, d1 = _WORDS.unpack(digest)
        # Slots first, then the table: the master records a crash before it frees
        # the slot, and the entry's last pid says whether this death is in it.
        dead_holder = 0
        q = self._q
        for i in range(self.capacity):
            base = i * SLOT_WORDS
            if (q[base + W_STATE] != FREE and q[base + W_BUSY] and q[base + W_POOL] == pool_id
                    and q[base + W_PID] != me and q[base + W_MSGID_DIGEST] == d0
                    and q[base + W_MSGID_DIGEST + 1] == d1 and _is_dead(q[base + W_PID])):
                dead_holder = q[base + W_PID]
                break
        b = self._crash_entry(pool_id, digest)
        count = q[b + C_COUNT] if b is not None else 0
        if dead_holder and (b is None or q[b + C_LAST_PID] != dead_holder):
            count += 1
        return count

    def allocate(self, pool_id: int) -> "Slot":
        """A free slot, zeroed, for a worker about to be forked (master only).

        Raises NoFreeSlot when every slot is taken (workers still leaving hold
        theirs until they are reaped): the master defers the spawn, it does not die."""
        for i in range(self.capacity):
            base = i * SLOT_WORDS
            if self._q[base + W_STATE] == FREE:
                self._mm[base * 8:(base + SLOT_WORDS) * 8] = bytes(SLOT_BYTES)
                self._q[base + W_STATE] = STARTING
                self._q[base + W_POOL] = pool_id
                return Slot(self, i)
        raise NoFreeSlot(f"no free worker slot ({self.capacity} in use)")


class NoFreeSlot(RuntimeError):
    """Every slot holds a worker: a spawn has to wait for one to be reaped."""


class Slot:
    """One worker's view of its slot (writer) and the master's (reader)."""

    __slots__ = ("table", "index", "_q", "_d", "_base", "_mm", "_record_lock")

    def __init__(self, table: SlotTable, index: int):
        self.table = table
        self.index = index
        self._q = table._q
        self._d = table._d
        self._mm = table._mm
        self._base = index * SLOT_WORDS
        # Outcomes are counted by the worker's I/O thread, and by its handler thread
        # for a success it acked itself: the lock keeps each increment whole.
        self._record_lock = threading.Lock()

    # --- written by the worker -------------------------------------------

    def set_pid(self, pid: int) -> None:
        self._q[self._base + W_PID] = pid

    def set_state(self, state: int) -> None:
        self._q[self._base + W_STATE] = state

    def tick(self) -> None:
        self._d[self._base + W_TICK] = time.monotonic()

    def begin(self, message_id: str, redelivered: bool, started: float,
              wait: float | None = None) -> None:
        """A task starts (``started``: its time.monotonic()): remember what we hold, before
        running anything (handler thread)."""
        b = self._base
        raw = message_id.encode("utf-8", "surrogatepass")
        mm = self._mm
        off = (b + W_MSGID_DIGEST) * 8
        mm[off:off + DIGEST_BYTES] = message_digest(message_id)   # cached: intake made it
        cut = 0
        if len(raw) > MSGID_BYTES:
            shown = MSGID_BYTES
            while raw[shown] & 0xC0 == 0x80:   # never split a character
                shown -= 1
            cut, raw = len(raw) - shown, raw[:shown]
        off = (b + W_MSGID) * 8
        mm[off:off + len(raw)] = raw
        q = self._q
        q[b + W_MSGID_LEN] = len(raw)
        q[b + W_MSGID_CUT] = cut
        self._d[b + W_BUSY_SINCE] = started   # CLOCK_MONOTONIC: one clock for all processes
        q[b + W_CONSUMED] += 1
        if redelivered:
            q[b + W_REDELIVERED] += 1
        if wait is not None:   # seconds in the queue before this start
            q[b + W_WAIT_BUCKETS + bisect.bisect_left(BUCKETS, wait)] += 1
            self._d[b + W_WAIT_SUM] += wait
        q[b + W_BUSY] = 1

    def end(self) -> None:
        """The handler returned (handler thread); the outcome is recorded once settled."""
        self._q[self._base + W_BUSY] = 0

    def record(self, outcome: int, duration: float) -> None:
        """A task was settled with ``outcome`` after running ``duration`` seconds (I/O
        thread; the handler thread for a success it acked itself)."""
        b = self._base
        q = self._q
        with self._record_lock:
            q[b + W_OUTCOMES + outcome] += 1
            q[b + W_BUCKETS + bisect.bisect_left(BUCKETS, duration)] += 1
            self._d[b + W_DURATION_SUM] += duration

    def subscribed(self) -> None:
        """The consumer is registered (I/O thread)."""
        q = self._q
        q[self._base + W_SUBSCRIBED] += 1
        q[self._base + W_STATE] = CONSUMING

    def set_blocked(self, blocked: bool) -> None:
        self._q[self._base + W_BLOCKED] = int(blocked)

    def set_draining(self) -> None:
        self._q[self._base + W_DRAINING] = 1

    def set_limit(self, bits: int) -> None:
        """What the worker waits for and holds of its queue's limits (I/O thread)."""
        self._q[self._base + W_LIMIT] = bits

    def waited(self, word: int, seconds: float) -> None:
        """Add ``seconds`` waited for a slot (W_LIMIT_WAITED_SLOT) or a token (I/O thread)."""
        self._d[self._base + word] += seconds
        if word == W_LIMIT_WAITED_TOKEN:
            self._q[self._base + W_LIMIT_TOKENS] += 1

    # --- written by the master ------------------------------------------

    def set_paused(self, paused: bool) -> None:
        """Master only: ask the worker to cancel (1) or restore (0) its consumer."""
        self._q[self._base + W_PAUSED] = int(paused)

    # --- read by the master ----------------------------------------------

    @property
    def pid(self) -> int:
        return self._q[self._base + W_PID]

    @property
    def state(self) -> int:
        return self._q[self._base + W_STATE]

    @property
    def draining(self) -> bool:
        return bool(self._q[self._base + W_DRAINING])

    @property
    def pool_id(self) -> int:
        return self._q[self._base + W_POOL]

    @property
    def last_tick(self) -> float:
        return self._d[self._base + W_TICK]

    @property
    def blocked(self) -> bool:
        return bool(self._q[self._base + W_BLOCKED])

    @property
    def paused(self) -> bool:
        return bool(self._q[self._base + W_PAUSED])

    @property
    def limit(self) -> int:
        """The limit word: WAITS_SLOT, WAITS_TOKEN, HOLDS_SLOT, LEADS_RATE bits."""
        return self._q[self._base + W_LIMIT]

    @property
    def serving(self) -> bool:
        """Consuming, or ready to and held back only by its queue's concurrency cap."""
        b = self._base
        return self._q[b + W_STATE] in (CONSUMING, LIMITED) and not self._q[b + W_DRAINING]

    @property
    def busy_since(self) -> float:
        """Monotonic start of the running task (meaningful while busy)."""
        return self._d[self._base + W_BUSY_SINCE]

    @property
    def tasks_done(self) -> int:
        """Tasks this worker settled, whatever the outcome."""
        b = self._base + W_OUTCOMES
        return sum(self._q[b:b + len(OUTCOMES)])

    @property
    def busy(self) -> bool:
        return bool(self._q[self._base + W_BUSY])

    @property
    def ever_consumed(self) -> bool:
        return self.subscriptions > 0

    @property
    def subscriptions(self) -> int:
        """Times this worker started consuming: more than once means it consumed again."""
        return self._q[self._base + W_SUBSCRIBED]

    @property
    def consuming(self) -> bool:
        """Subscribed to its queue right now (idle or busy) and not draining."""
        b = self._base
        return self._q[b + W_STATE] == CONSUMING and not self._q[b + W_DRAINING]

    @property
    def consumed(self) -> int:
        return self._q[self._base + W_CONSUMED]

    def message_id(self) -> str | None:
        """The message the worker holds, for logs and status (its first MSGID_BYTES
        bytes at most, then "…"), or None when idle."""
        b = self._base
        if not self._q[b + W_BUSY]:
            return None
        n = self._q[b + W_MSGID_LEN]
        off = (b + W_MSGID) * 8
        shown = bytes(self._mm[off:off + n]).decode("utf-8", "replace")
        return (shown + "…" if self._q[b + W_MSGID_CUT] else shown) or None

    def message_digest(self) -> bytes | None:
        """``message_digest`` of the whole id the worker holds, or None when idle."""
        b = self._base
        if not self._q[b + W_BUSY]:
            return None
        return _WORDS.pack(self._q[b + W_MSGID_DIGEST], self._q[b + W_MSGID_DIGEST + 1])

    def counters(self) -> dict[int, float]:
        return dict(zip(COUNTER_WORDS, self.counter_values()))

    def counter_values(self) -> list:
        """The COUNTER_WORDS, in that order: the master reads them for every worker at
        every scrape, so the runs of integer words are read as slices."""
        b, q, d = self._base, self._q, self._d
        return [q[b + W_REDELIVERED], d[b + W_DURATION_SUM], *q[b + W_OUTCOMES:b + W_CONSUMED],
                d[b + W_WAIT_SUM], *q[b + W_WAIT_BUCKETS:b + W_LIMIT],
                d[b + W_LIMIT_WAITED_SLOT], d[b + W_LIMIT_WAITED_TOKEN], q[b + W_LIMIT_TOKENS]]

    def release(self) -> None:
        self._q[self._base + W_STATE] = FREE


class Totals:
    """Counters summed over dead workers (master only), keyed by pool id."""

    def __init__(self) -> None:
        self._by_pool: dict[int, dict[int, float]] = {}

    def fold(self, pool_id: int, counters: dict[int, float]) -> None:
        acc = self._by_pool.setdefault(pool_id, dict.fromkeys(COUNTER_WORDS, 0))
        for w, v in counters.items():
            acc[w] += v

    def get(self, pool_id: int) -> dict[int, float]:
        return dict(self._by_pool.get(pool_id, dict.fromkeys(COUNTER_WORDS, 0)))


# A task's flag in /proc/PID/stat (include/linux/sched.h): set as the exit begins.
_PF_EXITING = 0x4


def _is_dead(pid: int) -> bool:
    """Gone, a zombie waiting to be reaped, or already exiting. A dying worker's sockets
    close only after every one of its threads is exiting, so the broker can redeliver its
    task before it is a zombie; its exit has begun by then, and this sees it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return stat_says_dying(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return True


def stat_says_dying(stat: bytes) -> bool:
    """From the text of /proc/PID/stat: a zombie, or a process whose exit has begun. The
    command name may hold spaces and parentheses, so the fields count from its last ')'.
    Text that does not parse is taken as a process gone."""
    try:
        fields = stat.rsplit(b")", 1)[1].split()
        return fields[0] == b"Z" or bool(int(fields[6]) & _PF_EXITING)
    except (IndexError, ValueError):
        return True
