"""One queue's pool of worker processes, as the master sees it.

A pool keeps ``workers`` processes consuming, replaces the dead, and decides
when replacing is pointless. Its states and transitions, in the manner of
supervisor's process states:

    RUNNING --worker died before it ever consumed--> BACKOFF (respawn after a delay)
    BACKOFF --a worker started consuming--> RUNNING
    BACKOFF --MAX_BOOT_FAILURES in a row--> FATAL
    any     --worker exit that no respawn can fix (exitcodes.FATAL_WORKER_EXITS)--> FATAL

A worker that had been consuming and then died (kill -9, OOM, segfault) is a
crash: it is replaced at once, without backoff, so a pool under chaos stays full.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from . import exitcodes
from .config import Broker, Queue
from .slots import SlotTable, Slot, Totals
from .worker import Worker

log = logging.getLogger("workqd.master")

RUNNING, BACKOFF, FATAL = "running", "backoff", "fatal"
_TRANSITIONS = {RUNNING: {BACKOFF, FATAL}, BACKOFF: {RUNNING, FATAL}, FATAL: set()}
MAX_BOOT_FAILURES = 5
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0
HUNG_AFTER = 30.0  # seconds without a tick from a worker's I/O loop

RESTART_REASONS = ("crash", "recycle", "timeout", "reload")


@dataclass
class WorkerProc:
    """The master's record of one forked worker."""
    pid: int
    number: int
    slot: Slot
    generation: int
    started: float
    retiring: str | None = None   # why it was asked to leave: "reload", "shutdown", "removed"
    signaled: bool = False        # TERM already sent
    killed: bool = False          # KILL already sent


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
    state: str = RUNNING
    fatal_reason: str = ""
    generation: int = 0
    boot_failures: int = 0
    next_spawn: float = 0.0
    procs: dict[int, WorkerProc] = field(default_factory=dict)
    removed: bool = False

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
        """Workers of the current generation that are not on their way out."""
        return [p for p in self.procs.values() if p.retiring is None and not p.slot.draining]

    def counters(self) -> dict[int, float]:
        """Counters of this queue: dead workers' totals plus every live worker's slot."""
        acc = self.totals.get(self.pool_id)
        for proc in self.procs.values():
            for w, v in proc.slot.counters().items():
                acc[w] += v
        return acc

    def consuming(self) -> int:
        return sum(1 for p in self.procs.values() if p.slot.consuming)

    def fully_consuming(self) -> bool:
        cur = self.current()
        return len(cur) >= self.queue.workers and all(p.slot.consuming for p in cur)

    # --- spawning --------------------------------------------------------

    def spawn_worker(self, number: int) -> WorkerProc:
        slot = self.slots.allocate(self.pool_id)
        worker = Worker(number, self.queue, self.broker, slot, self.wake_fd, self.log_level)
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            code = exitcodes.WORKER_CRASH
            try:
                self.child_init()
                code = worker.run()
            except BaseException:
                logging.getLogger("workqd.worker").exception("worker crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        slot.set_pid(pid)
        proc = WorkerProc(pid, number, slot, self.generation, time.monotonic())
        self.procs[pid] = proc
        log.debug("spawned worker %s#%d (pid %d)", self.name, number, pid)
        return proc

    def spawn_workers(self, now: float) -> None:
        """Top the pool up to its size, unless a backoff delay is running."""
        if self.state == FATAL or self.removed or now < self.next_spawn:
            return
        cur = self.current()
        used = {p.number for p in cur}
        for _ in range(self.queue.workers - len(cur)):
            number = next(n for n in range(1, len(used) + 2) if n not in used)
            used.add(number)
            self.spawn_worker(number)

    # --- stopping --------------------------------------------------------

    def kill_worker(self, proc: WorkerProc, sig: int) -> None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
        if sig == signal.SIGKILL:
            proc.killed = True
        else:
            proc.signaled = True

    def kill_workers(self, sig: int, reason: str) -> None:
        for proc in list(self.procs.values()):
            proc.retiring = proc.retiring or reason
            if sig == signal.SIGKILL or not proc.signaled:
                self.kill_worker(proc, sig)

    def retire_surplus(self) -> None:
        """After a reload: stop old workers only as new ones take over, so capacity never dips."""
        waiting = [p for p in self.procs.values() if p.retiring and not p.signaled]
        new_consuming = sum(1 for p in self.current() if p.slot.consuming)
        while waiting and new_consuming + len(waiting) - 1 >= self.queue.workers:
            self.kill_worker(waiting.pop(0), signal.SIGTERM)
        if self.removed:
            for p in waiting:
                self.kill_worker(p, signal.SIGTERM)

    def kill_hung_workers(self, now: float) -> None:
        for proc in self.procs.values():
            tick = proc.slot.last_tick
            if not proc.killed and tick and now - tick > HUNG_AFTER:
                log.error("worker %s#%d (pid %d) is hung: no sign of life for %.0fs; killing it",
                          self.name, proc.number, proc.pid, now - tick)
                self.kill_worker(proc, signal.SIGKILL)

    # --- reaping ---------------------------------------------------------

    def on_exit(self, proc: WorkerProc, status: int, now: float) -> None:
        """Account for a reaped worker and decide what happens next."""
        del self.procs[proc.pid]
        slot = proc.slot
        held = slot.message_id()
        consumed_ever = slot.ever_consumed
        if held and not proc.retiring and not (os.WIFEXITED(status) and os.WEXITSTATUS(status)
                                               in (exitcodes.WORKER_OK, exitcodes.WORKER_RECYCLE,
                                                   exitcodes.WORKER_TIMEOUT)):
            # Recorded before the slot is freed: a sibling that receives the
            # redelivery meanwhile counts this death exactly once (slots.crashes).
            crashes = self.slots.record_crash(self.pool_id, held, proc.pid)
        else:
            crashes = 0
        self.totals.fold(self.pool_id, slot.counters())
        slot.release()
        who = f"worker {self.name}#{proc.number} (pid {proc.pid})"
        holding = f" while running message {held}" if held else ""
        if os.WIFSIGNALED(status):
            code, how = None, f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        else:
            code = os.WEXITSTATUS(status)
            how = f"exited with status {code}"

        if proc.retiring:
            level = logging.INFO if code == exitcodes.WORKER_OK else logging.WARNING
            log.log(level, "%s %s%s (%s)", who, how, holding, proc.retiring)
            if proc.retiring == "reload":
                self.restarts["reload"] += 1
            return
        if code in exitcodes.FATAL_WORKER_EXITS:
            reason = exitcodes.FATAL_WORKER_EXITS[code]
            log.error("%s %s: %s; not respawning", who, how, reason)
            self.transition(FATAL, reason)
            return
        if code == exitcodes.WORKER_RECYCLE:
            log.info("%s recycled after %d tasks", who, slot.consumed)
            self.restarts["recycle"] += 1
            return
        if code == exitcodes.WORKER_TIMEOUT:
            log.warning("%s left after a task timed out", who)
            self.restarts["timeout"] += 1
            return
        level = logging.WARNING if code == exitcodes.WORKER_OK else logging.ERROR
        log.log(level, "%s %s%s", who, how, holding)
        self.restarts["crash"] += 1
        if crashes:
            if crashes >= self.queue.max_redeliveries:
                log.error("message %s has killed %d workers (max_redeliveries %d): it is poison "
                          "and goes to %s on its next delivery", held, crashes,
                          self.queue.max_redeliveries, self.queue.dead_letter_queue)
        if consumed_ever:
            self.boot_failures = 0
            self.transition(RUNNING)
            return
        # Died before it ever consumed: something in the start-up path is broken.
        self.boot_failures += 1
        if self.boot_failures >= MAX_BOOT_FAILURES:
            self.transition(FATAL, f"{self.boot_failures} workers in a row died before consuming")
            log.error("pool %s: %s; giving up", self.name, self.fatal_reason)
            return
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (self.boot_failures - 1))
        self.transition(BACKOFF)
        self.next_spawn = now + delay
        log.warning("pool %s: worker died before consuming (%d in a row); respawning in %.1fs",
                    self.name, self.boot_failures, delay)

    def note_progress(self) -> None:
        """Leave BACKOFF once a worker of this pool consumes again."""
        if self.state == BACKOFF and any(p.slot.consuming for p in self.procs.values()):
            self.boot_failures = 0
            self.transition(RUNNING)
