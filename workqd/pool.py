"""One queue's pool of worker processes, as the master sees it.

A pool keeps ``workers`` processes consuming, replaces the dead, and decides
when replacing is pointless. Its states and transitions, in the manner of
supervisor's process states:

    RUNNING --worker exited with an error before it ever consumed--> BACKOFF (respawn after a delay)
    BACKOFF --a worker started consuming--> RUNNING
    BACKOFF --MAX_BOOT_FAILURES in a row--> FATAL
    any     --worker exit that no respawn can fix (exitcodes.FATAL_WORKER_EXITS)--> FATAL

A worker that had been consuming and then died (kill -9, OOM, segfault) is a
crash: it is replaced at once, without backoff, so a pool under chaos stays
full. A worker killed by a signal before it consumed (someone's kill -9 while
the broker is down) is a crash too, replaced after a short pause: only a
worker that exits on its own before consuming says its start-up is broken,
and so does one killed because its handler's import overran ``import_timeout``.

Each worker has one state of its own (WorkerProc.state, WORKER_STATES below).
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from . import exitcodes, forks
from . import slots as slotmod
from .cancels import CancelTable
from .config import Broker, Queue
from .signals import signame
from .slots import NoFreeSlot, Slot, SlotTable, Totals
from .vocab import dead_letter_queue
from .worker import Worker

log = logging.getLogger("workqd.master")

RUNNING, BACKOFF, FATAL = "running", "backoff", "fatal"
_TRANSITIONS = {RUNNING: {BACKOFF, FATAL}, BACKOFF: {RUNNING, FATAL}, FATAL: set()}
MAX_BOOT_FAILURES = 5
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0
HUNG_AFTER = 30.0  # seconds without a tick from a worker's I/O loop
GROW_EVERY = 1.0   # autoscale: seconds between growths (new workers get to start)

# What a reaped worker's exit means (Exit.kind).
RETIRED = "retired"            # asked to leave (reload, stop, queue removed)
GAVE_UP = "fatal"              # an exit no respawn can fix
RECYCLED = "recycle"           # max_tasks_per_worker / max_memory_per_worker
TIMED_OUT = "timeout"          # left after a Python task ran past its timeout
CANCELLED = "cancelled"        # left after its running Python task was cancelled
TOOK_TOO_LONG = "consumer_timeout"  # the broker's consumer_timeout took its task back
CRASHED = "crash"              # died after consuming, or killed by a signal
BOOT_FAILED = "boot_failure"   # exited on its own before it ever consumed, or overran its import
_PLANNED_EXITS = (exitcodes.WORKER_OK, exitcodes.WORKER_RECYCLE, exitcodes.WORKER_TIMEOUT,
                  exitcodes.WORKER_CANCELLED)

# A worker's life as the master sees it: exactly one state at a time
# (WorkerProc.state), moved only by WorkerProc.change_state along these edges.
# Whether it is connecting, consuming or paused is the worker's own word in its
# slot; these states are what the master did to it and which clock applies.
FORKED = "forked"          # forked, has not reported yet
IMPORTING = "importing"    # loading its handler: the import budget runs, not the hang clock
UP = "up"                  # handler loaded: connecting, consuming or paused; the hang clock runs
RETIRING = "retiring"      # asked to leave; its TERM waits until a replacement takes over
SIGNALED = "signaled"      # TERM sent: it finishes its running task, then exits
KILLED = "killed"          # KILL sent: gone by the next reap
WORKER_STATES = {
    FORKED: {
        IMPORTING,   # FORKED -> IMPORTING: its slot says it loads its handler
        UP,          # FORKED -> UP: it loaded its handler between two turns of the loop
        RETIRING,    # FORKED -> RETIRING: a reload; it leaves once its replacement consumes
        SIGNALED,    # FORKED -> SIGNALED: stop, scale down or queue removed
        KILLED,      # FORKED -> KILLED: its import budget ran out, or stop at once
    },
    IMPORTING: {
        UP,          # IMPORTING -> UP: the handler is loaded
        RETIRING,    # IMPORTING -> RETIRING: a reload while it imports
        SIGNALED,    # IMPORTING -> SIGNALED: stop or scale down while it imports
        KILLED,      # IMPORTING -> KILLED: import_timeout ran out, or stop at once
    },
    UP: {
        RETIRING,    # UP -> RETIRING: a reload; TERM once the replacement consumes
        SIGNALED,    # UP -> SIGNALED: stop, scale down, queue removed
        KILLED,      # UP -> KILLED: hung (no tick for hung_after), or stop at once
    },
    RETIRING: {
        SIGNALED,    # RETIRING -> SIGNALED: its replacement consumes, or workqd stops
        KILLED,      # RETIRING -> KILLED: stop at once, or hung while waiting
    },
    SIGNALED: {
        KILLED,      # SIGNALED -> KILLED: shutdown_timeout ran out, a second TERM, or hung
    },
    KILLED: set(),   # only the reap ends it
}
LEAVING = (RETIRING, SIGNALED, KILLED)
KILLED_FOR_IMPORT = "import_timeout"   # WorkerProc.killed_for
KILLED_AS_HUNG = "hung"


@dataclass
class WorkerProc:
    """The master's record of one forked worker."""
    pid: int
    number: int
    slot: Slot
    retiring: str | None = None   # why it was asked to leave: "reload", "shutdown", "removed", "scale"
    state: str = FORKED
    spawned: float = 0.0          # monotonic time of the fork: the import budget counts from it
    killed_for: str | None = None  # why the master killed it on its own: hung, import_timeout

    def change_state(self, new: str) -> bool:
        """Move along WORKER_STATES; an edge not in the table is a bug, logged and refused
        (the master keeps running: the process is still reaped and accounted for)."""
        if new == self.state:
            return True
        if new not in WORKER_STATES[self.state]:
            log.error("worker #%d (pid %d): no move %s -> %s (a workqd bug); it stays %s",
                      self.number, self.pid, self.state, new, self.state)
            return False
        self.state = new
        return True


class Exit(NamedTuple):
    kind: str
    how: str                 # "killed by SIGKILL", "exited with status 3"
    code: int | None         # exit status, None when killed by a signal
    held: str | None         # message the worker held when it died


def classify(proc: WorkerProc, status: int, held: str | None, ever_consumed: bool) -> Exit:
    """What a wait status means for the pool; pure, so the table is unit-tested."""
    if os.WIFSIGNALED(status):
        # Any number: a real-time signal has no signal.Signals member.
        code, how = None, f"killed by {signame(os.WTERMSIG(status))}"
    else:
        code = os.WEXITSTATUS(status)
        how = f"exited with status {code}"
    if proc.retiring:
        kind = RETIRED
    elif proc.killed_for == KILLED_FOR_IMPORT:
        kind = BOOT_FAILED   # its start-up is what is broken, however it ended
    elif code in exitcodes.FATAL_WORKER_EXITS:
        kind = GAVE_UP
    elif code == exitcodes.WORKER_RECYCLE:
        kind = RECYCLED
    elif code == exitcodes.WORKER_TIMEOUT:
        kind = TIMED_OUT
    elif code == exitcodes.WORKER_CANCELLED:
        kind = CANCELLED
    elif code == exitcodes.WORKER_CONSUMER_TIMEOUT:
        kind = TOOK_TOO_LONG
    elif ever_consumed or code is None:
        kind = CRASHED
    else:
        kind = BOOT_FAILED
    return Exit(kind, how, code, held)


@dataclass
class Pool:
    queue: Queue
    pool_id: int
    restarts: dict[str, int]       # by reason; shared with any earlier pool of this queue
    broker: Broker
    slots: SlotTable
    totals: Totals
    wake_fd: int
    log_level: str
    child_init: Callable[[], None]   # closes the master's resources in a forked child
    # The seams to the operating system, so the decisions run under test without
    # processes: ``spawn(worker) -> pid`` forks (default: a real fork running
    # ``worker.run``), ``kill(pid, sig)`` signals.
    spawn: Callable[[Worker], int] | None = None
    kill: Callable[[int, int], None] = os.kill
    cancels: CancelTable | None = None   # the master's, shared with every worker it forks
    # Seconds without a tick before a worker counts as hung (read at creation).
    hung_after: float = field(default_factory=lambda: HUNG_AFTER)
    state: str = RUNNING
    fatal_reason: str = ""
    boot_failures: int = 0
    next_spawn: float = 0.0
    procs: dict[int, WorkerProc] = field(default_factory=dict)
    removed: bool = False
    # Set by the control socket: how many workers to keep (``queue.workers`` until
    # `workqctl scale`; a reload sets it back) and whether they take tasks. Both
    # live in the master only, so they survive a reload and not a restart.
    size: int = 0
    paused: bool = False
    _idle_since: float = 0.0   # autoscale: since when some worker has been idle, 0 = none is
    _last_resize: float = 0.0
    _gate: tuple[int, int] | None = None   # (read, write) while a batch is being forked

    def __post_init__(self) -> None:
        self.size = self.size or self.queue.workers

    @property
    def name(self) -> str:
        return self.queue.name

    def transition(self, new: str, why: str = "") -> None:
        if new == self.state:
            return
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"pool {self.name}: no transition {self.state} -> {new}")
        self.state = new
        if new == FATAL:
            self.fatal_reason = why

    # --- views -----------------------------------------------------------

    def current(self) -> list[WorkerProc]:
        """Workers that are not on their way out."""
        return [p for p in self.procs.values() if p.retiring is None and not p.slot.draining]

    def counters(self) -> dict[int, float]:
        """Counters of this queue: dead workers' totals plus every live worker's slot."""
        acc = self.totals.get(self.pool_id)
        if not self.procs:
            return acc
        # Word by word over the totals and all workers at once: every scrape and
        # every status reads this, for every queue.
        words = slotmod.COUNTER_WORDS
        columns = zip(map(acc.__getitem__, words),
                      *(proc.slot.counter_values() for proc in self.procs.values()))
        return dict(zip(words, map(sum, columns)))

    def consuming(self) -> int:
        return sum(1 for p in self.procs.values() if p.slot.consuming)

    def limited(self) -> int:
        """Workers ready to consume, held back by the queue's concurrency cap."""
        return sum(1 for p in self.procs.values()
                   if p.slot.state == slotmod.LIMITED and not p.slot.draining)

    def fully_consuming(self) -> bool:
        """Every worker is where it should be: consuming, or, paused, connected and holding."""
        cur = self.current()
        return len(cur) >= self.size and all(self._in_place(p) for p in cur)

    def _in_place(self, proc: WorkerProc) -> bool:
        # Waiting for a concurrency slot is where a worker of a capped queue should be.
        return proc.slot.state == slotmod.PAUSED if self.paused else proc.slot.serving

    def holding(self) -> int:
        """Workers connected but not consuming because the pool is paused."""
        return sum(1 for p in self.procs.values() if p.slot.state == slotmod.PAUSED)

    # --- autoscale ----------------------------------------------------------

    def autoscale(self, now: float, ready: int | None) -> None:
        """``workers: {min, max}``: grow when tasks wait and every worker is busy; shrink by
        one when a worker has been idle for ``idle_after``. Hysteresis: new workers must
        be busy too before the next growth, and a shrink waits a full idle period after
        any resize, so a pool under steady load does not flap."""
        a = self.queue.autoscale
        if a is None or self.paused or self.removed or self.state == FATAL:
            return
        cur = self.current()
        # A worker holding a task until its rate token comes is not idle either.
        idle = [p for p in cur if p.slot.consuming and not p.slot.busy
                and not p.slot.limit & slotmod.WAITS_TOKEN]
        if idle and not ready:   # a worker between two tasks while tasks wait is not idle
            self._idle_since = self._idle_since or now
        else:
            self._idle_since = 0.0
        if (ready and self.size < a.max and len(cur) >= self.size and not idle
                and all(p.slot.busy for p in cur) and now - self._last_resize >= GROW_EVERY):
            old, self.size = self.size, min(a.max, self.size + max(1, ready))
            self._last_resize = now
            log.info("autoscale: queue %s grows from %d to %d workers (%d tasks wait, every "
                     "worker busy)", self.name, old, self.size, ready)
        elif (self.size > a.min and self._idle_since
              and now - max(self._idle_since, self._last_resize) >= a.idle_after):
            self.size -= 1
            self._last_resize = now
            self.shrink()
            log.info("autoscale: queue %s shrinks to %d workers (idle for %gs)", self.name,
                     self.size, a.idle_after)

    # --- steering (the control socket) -----------------------------------

    def set_paused(self, paused: bool) -> None:
        """Workers read their paused word within a tick (process.Worker._follow_pause)."""
        self.paused = paused
        for proc in self.procs.values():
            proc.slot.set_paused(paused)

    def shrink(self) -> int:
        """Retire workers above ``size``: idle ones first; a busy one finishes its task
        first (TERM), so no task is cut. Returns how many were asked to leave."""
        cur = self.current()
        surplus = len(cur) - self.size
        if surplus <= 0:
            return 0
        # Idle first, then the most recently spawned.
        order = sorted(cur, key=lambda p: (p.slot.busy, -p.number))
        for proc in order[:surplus]:
            proc.retiring = "scale"
            self.signal_worker(proc, signal.SIGTERM)
        return surplus

    # --- spawning --------------------------------------------------------

    def spawn_worker(self, number: int, now: float = 0.0) -> WorkerProc:
        """Fork one worker. Raises NoFreeSlot (every slot held) or OSError (the fork
        failed), with nothing left allocated."""
        slot = self.slots.allocate(self.pool_id)
        slot.set_paused(self.paused)   # before the fork: the worker starts as the pool is
        worker = Worker(number, self.queue, self.broker, slot, self.wake_fd, self.log_level,
                        self.cancels)
        try:
            pid = (self.spawn or self._fork)(worker)
        except BaseException:
            slot.release()
            raise
        slot.set_pid(pid)
        proc = WorkerProc(pid, number, slot, spawned=now)
        self.procs[pid] = proc
        log.debug("spawned worker %s#%d (pid %d)", self.name, number, pid)
        return proc

    def _fork(self, worker: Worker) -> int:
        pid = forks.fork()
        if pid == 0:  # the child never returns from here
            code = exitcodes.WORKER_CRASH
            try:
                self.child_init()
                if self._gate is not None:
                    _wait_at_gate(*self._gate)
                code = worker.run()
            except BaseException:
                logging.getLogger("workqd.worker").exception("worker crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        return pid

    def spawn_workers(self, now: float) -> OSError | NoFreeSlot | None:
        """Top the pool up to its size, unless a backoff delay is running. Returns what
        kept some from starting (no free slot, a failed fork), None when all started:
        the master decides what that means; the next turn tries again."""
        if self.state == FATAL or self.removed or now < self.next_spawn:
            return None
        cur = self.current()
        used = {p.number for p in cur}
        missing = self.size - len(cur)
        # A batch's children wait at a gate until the last of them is forked. Started at
        # once, each would take the CPU from the master while it forks the next (a
        # starting worker is busy for 10-20 ms): 64 forks then took one to one and a
        # half seconds on 2 cores, against a fifth of one with the gate.
        if missing > 1 and self.spawn is None:
            try:
                self._gate = os.pipe2(os.O_CLOEXEC)
            except OSError:
                self._gate = None   # out of descriptors: fork without the gate
        try:
            for _ in range(missing):
                number = next(n for n in range(1, len(used) + 2) if n not in used)
                try:
                    self.spawn_worker(number, now)
                except (NoFreeSlot, OSError) as e:
                    return e
                used.add(number)
            return None
        finally:
            if self._gate is not None:
                for fd in self._gate:
                    os.close(fd)   # the last write end: every child at the gate reads EOF
                self._gate = None

    # --- stopping --------------------------------------------------------

    def signal_worker(self, proc: WorkerProc, sig: int) -> None:
        """TERM moves it to SIGNALED, KILL to KILLED; a TERM to a killed one is moot."""
        if proc.state == KILLED and sig != signal.SIGKILL:
            return
        try:
            self.kill(proc.pid, sig)
        except ProcessLookupError:
            return
        proc.change_state(KILLED if sig == signal.SIGKILL else SIGNALED)

    def retire(self, proc: WorkerProc, reason: str) -> None:
        """Ask it to leave later (retire_surplus sends the TERM); the first reason stays."""
        proc.retiring = proc.retiring or reason
        if proc.state not in LEAVING:
            proc.change_state(RETIRING)

    def retire_workers(self, reason: str, sig: int = signal.SIGTERM) -> None:
        """Ask every worker to leave (TERM: after its task; KILL: now)."""
        for proc in list(self.procs.values()):
            proc.retiring = proc.retiring or reason
            if sig == signal.SIGKILL or proc.state not in (SIGNALED, KILLED):
                self.signal_worker(proc, sig)

    def retire_surplus(self) -> None:
        """After a reload: stop old workers only as new ones take over, so capacity never dips."""
        waiting = [p for p in self.procs.values() if p.state == RETIRING]
        new_consuming = sum(1 for p in self.current() if self._in_place(p))
        while waiting and new_consuming + len(waiting) - 1 >= self.size:
            self.signal_worker(waiting.pop(0), signal.SIGTERM)
        if self.removed:
            for p in waiting:
                self.signal_worker(p, signal.SIGTERM)

    def follow_workers(self, now: float) -> None:
        """One tick of every worker's state machine: follow what its slot says, then
        apply the clock its state calls for (the import budget or the hang clock)."""
        for proc in list(self.procs.values()):
            word = proc.slot.state
            importing = word in (slotmod.STARTING, slotmod.IMPORTING)
            if proc.state == FORKED and word == slotmod.IMPORTING:
                proc.change_state(IMPORTING)      # FORKED -> IMPORTING
            elif proc.state in (FORKED, IMPORTING) and not importing:
                proc.change_state(UP)             # FORKED/IMPORTING -> UP
            if proc.state == KILLED:
                continue
            if importing:
                # Two clocks, kept apart: an import runs no I/O loop, so it cannot
                # tick; it has its own budget, counted from the fork.
                took = now - proc.spawned
                if took > self.queue.import_timeout:
                    log.error("worker %s#%d (pid %d) has not loaded its handler after %.0fs "
                              "(import_timeout %gs); killing it", self.name, proc.number,
                              proc.pid, took, self.queue.import_timeout)
                    proc.killed_for = KILLED_FOR_IMPORT
                    self.signal_worker(proc, signal.SIGKILL)
                continue
            tick = proc.slot.last_tick
            if tick and now - tick > self.hung_after:
                log.error("worker %s#%d (pid %d) is hung: no sign of life for %.0fs; killing it",
                          self.name, proc.number, proc.pid, now - tick)
                proc.killed_for = KILLED_AS_HUNG
                self.signal_worker(proc, signal.SIGKILL)

    # --- reaping ---------------------------------------------------------

    def on_exit(self, proc: WorkerProc, status: int, now: float) -> None:
        """A reaped worker: classify its exit, then account for it."""
        del self.procs[proc.pid]
        slot = proc.slot
        ex = classify(proc, status, slot.message_id(), slot.ever_consumed)
        crashes = 0
        if (ex.held and ex.kind in (CRASHED, BOOT_FAILED, GAVE_UP, TOOK_TOO_LONG)
                and ex.code not in _PLANNED_EXITS):
            # Recorded before the slot is freed: a sibling that receives the
            # redelivery meanwhile counts this death exactly once (slots.crashes).
            crashes = self.slots.record_crash(self.pool_id, slot.message_digest(), proc.pid)
        self.totals.fold(self.pool_id, slot.counters())
        tasks_taken = slot.consumed
        slot.release()
        self._account(proc, ex, crashes, tasks_taken, now)

    def _account(self, proc: WorkerProc, ex: Exit, crashes: int, tasks_taken: int,
                 now: float) -> None:
        who = f"worker {self.name}#{proc.number} (pid {proc.pid})"
        holding = f" while running message {ex.held}" if ex.held else ""
        if ex.kind == RETIRED:
            level = logging.INFO if ex.code == exitcodes.WORKER_OK else logging.WARNING
            log.log(level, "%s %s%s (%s)", who, ex.how, holding, proc.retiring)
            if proc.retiring == "reload":
                self.restarts["reload"] += 1
            return
        if ex.kind == GAVE_UP:
            reason = exitcodes.FATAL_WORKER_EXITS[ex.code]
            log.error("%s %s: %s; not respawning", who, ex.how, reason)
            self.transition(FATAL, reason)
            return
        if ex.kind == RECYCLED:
            log.info("%s recycled after %d tasks", who, tasks_taken)
            self.restarts["recycle"] += 1
            return
        if ex.kind == TIMED_OUT:
            log.warning("%s left after a task timed out", who)
            self.restarts["timeout"] += 1
            return
        if ex.kind == CANCELLED:
            log.info("%s left after its running task was cancelled", who)
            self.restarts["cancelled"] += 1
            return
        if ex.kind == TOOK_TOO_LONG:
            log.warning("%s left after the broker's consumer_timeout took back message %s "
                        "(%d time(s) so far)", who, ex.held, crashes)
            self.restarts["consumer_timeout"] += 1
            self._warn_if_poison(ex.held, crashes)
            return
        level = logging.WARNING if ex.code == exitcodes.WORKER_OK else logging.ERROR
        log.log(level, "%s %s%s", who, ex.how, holding)
        self.restarts["crash"] += 1
        self._warn_if_poison(ex.held, crashes)
        if ex.kind == CRASHED:
            if self.state == BACKOFF:
                self.next_spawn = now + BACKOFF_BASE  # not a boot failure, but keep pacing
            return
        # Exited on its own before it ever consumed, or overran its import budget:
        # its start-up path is broken.
        self.boot_failures += 1
        if self.boot_failures >= MAX_BOOT_FAILURES:
            why = f"{self.boot_failures} workers in a row died before consuming"
            if proc.killed_for == KILLED_FOR_IMPORT:
                why += (f" (the last one's handler import ran past import_timeout "
                        f"{self.queue.import_timeout:g}s)")
            self.transition(FATAL, why)
            log.error("pool %s: %s; giving up", self.name, self.fatal_reason)
            return
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (self.boot_failures - 1))
        self.transition(BACKOFF)
        self.next_spawn = now + delay
        log.warning("pool %s: worker died before consuming (%d in a row); respawning in %.1fs",
                    self.name, self.boot_failures, delay)

    def _warn_if_poison(self, held: str | None, crashes: int) -> None:
        if held and crashes >= self.queue.max_redeliveries:
            log.error("message %s has killed %d workers (max_redeliveries %d): it is poison "
                      "and goes to %s on its next delivery", held, crashes,
                      self.queue.max_redeliveries, dead_letter_queue(self.name))

    def note_progress(self) -> None:
        """Leave BACKOFF once a worker of this pool consumes again."""
        if any(p.slot.serving for p in self.procs.values()):
            self.boot_failures = 0
            if self.state == BACKOFF:
                self.transition(RUNNING)


def _wait_at_gate(read_fd: int, write_fd: int) -> None:
    """In a child forked in a batch: return once the master has forked the whole batch
    (or died), when no write end of the gate is left open. Each child closes its own
    copy first; the master closes the last one after the batch, whatever happens in it."""
    os.close(write_fd)
    try:
        os.read(read_fd, 1)
    finally:
        os.close(read_fd)
