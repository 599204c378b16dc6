"""Cancelled tasks: a durable log on the broker, and a table every worker of a host reads.

``workqctl cancel ID`` and ``Client.cancel`` append the id to the stream queue
``workq.cancel``. A stream is a log that consumers read without removing what they
read: every daemon of every host reads all of it, a restarted daemon reads it again
from the start of its retention, and the broker drops entries older than that
retention (``x-max-age``) by itself. A queue would hand each cancel to one daemon
only, and a fanout of per-daemon queues would lose the cancels published while a
daemon was down.

On each host the master's poller process reads the stream and writes each id's
digest, with when it was cancelled, into a table in shared memory that the master
maps before forking. Workers look up every delivery before running it, and the
task they are running on every tick, with plain memory reads. One writer (the
poller), many readers: an entry's digest is written before its stamp, and a reader
takes an entry only once its stamp is set, so it never sees half an entry as whole.
A word after the entries says the poller has read the log to its end once: a
worker waits for it (a few seconds at most) before it consumes, so a restarted
daemon does not run a task whose cancel it has not read yet. The end is the
poller's own mark entry (``H_MARK``), appended with a confirm before it reads.

One more word, about the vhost's delay levels rather than cancels, lives here because
this is the one mapping the poller writes and every worker reads: whether the poller
has declared the levels on its connection. A worker then declares only its own
queues and binding instead of re-asserting some ninety shared objects per connection.
"""

from __future__ import annotations

import mmap
import struct
import time

STREAM = "workq.cancel"
RETENTION = 7 * 86400            # seconds a cancel is kept (the stream's x-max-age)
H_CANCELLED_MS = "x-workq-cancelled-ms"
# A reader's own entry, appended before it reads: once it reads it back, it has read
# every cancel confirmed before (the stream's message count, the other way to know the
# log's end, is the broker's periodic statistics and lags by seconds). Not a cancel.
H_MARK = "x-workq-log-mark"

_ENTRY = struct.Struct("@16sq")  # digest, cancelled at (ms since the epoch; 0 = empty)
assert _ENTRY.size == 24         # three words: cancelled_at reads the stamp as word 3i + 2
_LOADED = struct.Struct("@q")    # after the entries: 1 once the log was read to its end
_WRITTEN = struct.Struct("@q")   # after that: entries ever written (0: nothing to look up)
_LEVELS = struct.Struct("@q")    # after that: LEVELS_* (the poller's word on the delay levels)
LEVELS_UNKNOWN = 0               # the poller has not tried yet
LEVELS_DECLARED = 1              # the poller declared every level, exchange and binding
LEVELS_REFUSED = 2               # the broker refused them: workers declare (and report) it
CAPACITY = 1 << 16               # entries: 1.5 MiB of address space, touched as used
PROBES = 32                      # slots looked at before the oldest in reach is replaced


def stream_arguments(retention: float = RETENTION) -> dict:
    return {"x-queue-type": "stream", "x-max-age": f"{int(retention)}s"}


class CancelTable:
    """Fixed-size open-addressing set of digests; the poller adds, workers look up."""

    def __init__(self, capacity: int = CAPACITY, retention: float = RETENTION):
        if capacity & (capacity - 1):
            raise ValueError("capacity must be a power of two")
        self.capacity = capacity
        self.retention = retention
        # Anonymous mappings are shared with the children forked after this.
        self._mm = mmap.mmap(-1, capacity * _ENTRY.size + _LOADED.size + _WRITTEN.size
                             + _LEVELS.size)
        self._loaded_at = capacity * _ENTRY.size
        self._written_at = self._loaded_at + _LOADED.size
        self._levels_at = self._written_at + _WRITTEN.size
        # The same memory as 64-bit words, for the per-delivery look-up: an entry is
        # three words (two of digest, then the stamp), the written count a word after.
        self._words = memoryview(self._mm).cast("q")
        self._written_word = self._written_at // 8
        self.replaced = 0        # live entries given up for room (the poller logs it)

    def _home(self, digest: bytes) -> int:
        return int.from_bytes(digest[:8], "little") & (self.capacity - 1)

    def add(self, digest: bytes, cancelled_ms: int, now_ms: int | None = None) -> bool:
        """The poller only. False when the id was already in the table."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        stale = now_ms - int(self.retention * 1000)
        home = self._home(digest)
        oldest, oldest_at = None, None
        for k in range(PROBES):
            i = (home + k) & (self.capacity - 1)
            d, at = _ENTRY.unpack_from(self._mm, i * _ENTRY.size)
            if at and d == digest:
                return False
            if not at or at < stale:
                self._write(i, digest, cancelled_ms)
                return True
            if oldest_at is None or at < oldest_at:
                oldest, oldest_at = i, at
        self.replaced += 1
        self._write(oldest, digest, cancelled_ms)
        return True

    def _write(self, i: int, digest: bytes, cancelled_ms: int) -> None:
        off = i * _ENTRY.size
        # Readers take an entry by its stamp: clear it, write the digest, stamp it last.
        struct.pack_into("@q", self._mm, off + 16, 0)
        self._mm[off:off + 16] = digest
        struct.pack_into("@q", self._mm, off + 16, cancelled_ms)
        written = _WRITTEN.unpack_from(self._mm, self._written_at)[0]
        _WRITTEN.pack_into(self._mm, self._written_at, written + 1)

    def cancelled(self, digest: bytes, now_ms: int | None = None) -> bool:
        """Any process: was this id cancelled within the retention?"""
        return self.cancelled_at(digest, now_ms) != 0

    def cancelled_at(self, digest: bytes, now_ms: int | None = None) -> int:
        """Any process: when this id was cancelled (ms since the epoch), 0 when it was
        not, within the retention."""
        # Most hosts never cancel anything: then every delivery's look-up is one read.
        words = self._words
        if not words[self._written_word]:
            return 0
        # A host that has some cancels: nearly every id's first probe is an empty slot,
        # so that costs one more word read; the clock is read only for an id found. The
        # stamp is read before the digest: the poller writes it last.
        mask = self.capacity - 1
        home = int.from_bytes(digest[:8], "little") & mask
        if not words[home * 3 + 2]:
            return 0
        for k in range(PROBES):
            i = (home + k) & mask
            at = words[i * 3 + 2]
            if not at:
                return 0
            off = i * _ENTRY.size
            if self._mm[off:off + 16] == digest:
                now_ms = int(time.time() * 1000) if now_ms is None else now_ms
                return at if at >= now_ms - int(self.retention * 1000) else 0
        return 0

    @property
    def loaded(self) -> bool:
        """Any process: has the poller read the whole log once (or given up on it)?"""
        return _LOADED.unpack_from(self._mm, self._loaded_at)[0] == 1

    def set_loaded(self) -> None:
        """The poller only: every cancel in the log up to now is in the table."""
        _LOADED.pack_into(self._mm, self._loaded_at, 1)

    @property
    def levels(self) -> int:
        """Any process: the poller's LEVELS_* word on the vhost's delay levels."""
        return _LEVELS.unpack_from(self._mm, self._levels_at)[0]

    def set_levels(self, word: int) -> None:
        """The poller only."""
        _LEVELS.pack_into(self._mm, self._levels_at, word)

    def count(self, now_ms: int | None = None) -> int:
        """Cancels held within the retention. Reads the whole table (a few
        milliseconds) once anything was written: the poller's, once per report, not a
        worker's."""
        # Reading a page of the shared mapping gives it memory of its own even if it was
        # never written: on a host that never cancelled anything, read nothing.
        if not self._words[self._written_word]:
            return 0
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        stale = now_ms - int(self.retention * 1000)
        with memoryview(self._mm)[:self._loaded_at] as raw, raw.cast("q") as words:
            # Three words an entry (two of digest, one of stamp): every third is a stamp.
            return sum(1 for at in words[2::3] if at and at >= stale)
