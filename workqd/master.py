"""The master: keeps the pools at size, answers systemd and Prometheus, runs no task code.

``run`` reads like the arbiter it is modelled on: wait for a signal (with a
deadline), handle it, reap, keep the pools full, report. Everything that talks
to the outside (HTTP, the queue-depth poller, sd_notify) lives in its own module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time

from . import config as config_mod
from . import __version__, exitcodes, logsetup
from .httpd import HttpServer
from .notify import Notifier
from .poller import QueuePoller
from .pool import FATAL, RESTART_REASONS, Pool
from .signals import SignalQueue
from .slots import BUSY, OUTCOME_WORDS, W_REDELIVERED, SlotTable, Totals

log = logging.getLogger("workqd.master")

LOOP_TIMEOUT = 1.0       # the loop turns at least this often, signals or not
STARTING_TIMEOUT = 0.05  # while not ready yet, so READY goes out promptly
# A reload whose new workers never consume (e.g. an unreachable new broker) must
# not leave systemd in "reloading" forever; below the unit's TimeoutStartSec.
RELOAD_READY_TIMEOUT = 20.0


class Master:
    def __init__(self, cfg: config_mod.Config):
        self.cfg = cfg
        self.pid = os.getpid()
        self.signals = SignalQueue()
        self.slots = SlotTable()
        self.totals = Totals()
        self.pools: dict[str, Pool] = {}
        self._pool_ids: dict[str, int] = {}   # stable per queue name, so totals survive reloads
        self._restarts: dict[int, dict[str, int]] = {}  # by pool id, for the same reason
        self.notifier = Notifier()
        self.http: HttpServer | None = None
        self.poller: QueuePoller | None = None
        self.draining = False
        self.stop_deadline = 0.0
        self.exit_code = exitcodes.OK
        self.ready_sent = False
        self.started = time.monotonic()
        self.last_loop = time.monotonic()
        self.reloading = False
        self.reload_started = 0.0
        self._orphans: list[Pool] = []  # pools removed and re-added while still draining
        # Held while pools or their worker records change, and by the scrape that
        # reads them, so a reaped worker is never counted both live and folded.
        self.lock = threading.Lock()

    # --- the loop --------------------------------------------------------

    def run(self) -> int:
        self.start()
        while True:
            timeout = LOOP_TIMEOUT if self.ready_sent or self.draining else STARTING_TIMEOUT
            for sig in self.signals.wait(timeout):
                with self.lock:
                    self.handle_signal(sig)
            now = time.monotonic()
            self.last_loop = now
            with self.lock:
                self.reap_workers(now)
                if self.draining:
                    if not any(p.procs for p in [*self.pools.values(), *self._orphans]):
                        break
                    if now >= self.stop_deadline:
                        self.kill_workers(signal.SIGKILL, "shutdown")
                else:
                    self.manage_pools(now)
            self.report(now)
        self.stop_services()
        log.info("stopped")
        return self.exit_code

    def start(self) -> None:
        for warning in self.cfg.warnings:
            log.warning("%s", warning)
        self.signals.install()
        self.http = HttpServer(self.cfg.metrics_listen, self)  # raises OSError if taken
        self.poller = QueuePoller(self.cfg)
        self.http.start()
        self.poller.start()
        with self.lock:
            for queue in self.cfg.queues:
                self.add_pool(queue)
        log.info("workqd %s started (pid %d): %s; metrics on http://%s:%d/metrics",
                 __version__, self.pid, ", ".join(f"{q.name}: {q.workers} workers"
                                                 for q in self.cfg.queues),
                 *self.cfg.metrics_listen)

    # --- signals ---------------------------------------------------------

    def handle_signal(self, sig: int) -> None:
        if sig == signal.SIGCHLD:
            return  # reap_workers runs every turn
        if sig in (signal.SIGTERM, signal.SIGINT):
            if self.draining:
                log.warning("second %s: stopping at once, cutting running tasks "
                            "(the broker requeues them)", signal.Signals(sig).name)
                self.kill_workers(signal.SIGKILL, "shutdown")
            else:
                self.begin_stop(f"{signal.Signals(sig).name} received")
        elif sig == signal.SIGQUIT:
            log.warning("SIGQUIT: stopping at once")
            self.begin_stop("SIGQUIT received")
            self.kill_workers(signal.SIGKILL, "shutdown")
        elif sig == signal.SIGHUP:
            self.reload()

    def begin_stop(self, why: str, exit_code: int = exitcodes.OK) -> None:
        if self.draining:
            return
        self.draining = True
        self.exit_code = exit_code
        self.stop_deadline = time.monotonic() + self.cfg.shutdown_timeout
        self.notifier.stopping()
        busy = sum(1 for p in self.pools.values() for w in p.procs.values()
                   if w.slot.state == BUSY)
        log.info("%s: stopping; %d running task(s) get up to %gs to finish", why, busy,
                 self.cfg.shutdown_timeout)
        self.kill_workers(signal.SIGTERM, "shutdown")

    def kill_workers(self, sig: int, reason: str) -> None:
        for pool in [*self.pools.values(), *self._orphans]:
            pool.kill_workers(sig, reason)

    # --- reload ----------------------------------------------------------

    def reload(self) -> None:
        if self.draining:
            return
        self.notifier.reloading()
        try:
            new = config_mod.load(self.cfg.path)
        except config_mod.ConfigError as e:
            for line in e.problems:
                log.error("reload refused, keeping the running config: %s", line)
            self.notifier.ready(self.status_text())
            return
        for warning in new.warnings:
            log.warning("%s", warning)
        if new.metrics_listen != self.cfg.metrics_listen:
            # The listening socket is bound once; the new workers do get new broker settings.
            log.warning("reload: metrics.listen changes need a restart; keeping %s:%d",
                        *self.cfg.metrics_listen)
            new = dataclasses.replace(new, metrics_listen=self.cfg.metrics_listen)
        names = {q.name for q in new.queues}
        for name, pool in self.pools.items():
            if name not in names and not pool.removed:
                log.info("reload: queue %s removed; its workers finish their tasks and leave", name)
                pool.removed = True
                pool.kill_workers(signal.SIGTERM, "removed")
        for queue in new.queues:
            pool = self.pools.get(queue.name)
            if pool is None or pool.removed:
                if pool is not None:
                    del self.pools[queue.name]  # re-added: let the old one's workers drain apart
                    self._orphans.append(pool)
                self.add_pool(queue, new)
                log.info("reload: queue %s added with %d workers", queue.name, queue.workers)
            else:
                self.replace_pool_workers(pool, queue, new)
        self.cfg = new
        logsetup.configure(new.log_level, f"master (pid {self.pid})")
        self.poller.reconfigure(new)
        self.reloading = True
        self.reload_started = time.monotonic()
        log.info("reload: new config from %s applied; replacing workers gradually", new.path)

    def replace_pool_workers(self, pool: Pool, queue: config_mod.Queue,
                             cfg: config_mod.Config) -> None:
        for proc in pool.procs.values():
            proc.retiring = proc.retiring or "reload"
        pool.queue = queue
        pool.broker = cfg.broker
        pool.log_level = cfg.log_level
        pool.generation += 1

    def add_pool(self, queue: config_mod.Queue, cfg: config_mod.Config | None = None) -> Pool:
        cfg = cfg or self.cfg
        pool_id = self._pool_ids.setdefault(queue.name, len(self._pool_ids) + 1)
        restarts = self._restarts.setdefault(pool_id, dict.fromkeys(RESTART_REASONS, 0))
        pool = Pool(queue=queue, pool_id=pool_id, restarts=restarts, broker=cfg.broker,
                    slots=self.slots,
                    totals=self.totals, wake_fd=self.signals.wake_w, log_level=cfg.log_level,
                    child_init=self.close_in_child)
        self.pools[queue.name] = pool
        return pool

    def close_in_child(self) -> None:
        """Runs in a freshly forked worker: drop what belongs to the master."""
        self.signals.close_in_child()
        if self.http is not None:
            self.http.close_in_child()

    # --- workers ---------------------------------------------------------

    def reap_workers(self, now: float) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for pool in [*self.pools.values(), *self._orphans]:
                proc = pool.procs.get(pid)
                if proc is not None:
                    pool.on_exit(proc, status, now)
                    break
            else:
                log.debug("reaped unknown child %d", pid)

    def manage_pools(self, now: float) -> None:
        for name, pool in list(self.pools.items()):
            pool.note_progress()
            if pool.state == FATAL:
                log.error("pool %s cannot stay up: %s; stopping workqd", name, pool.fatal_reason)
                self.begin_stop(f"pool {name} failed", exitcodes.POOL_FAILED)
                return
            pool.spawn_workers(now)
            pool.retire_surplus()
            pool.kill_hung_workers(now)
            if pool.removed and not pool.procs:
                del self.pools[name]
        self._orphans = [p for p in self._orphans if p.procs]
        for pool in self._orphans:
            pool.retire_surplus()

    # --- reporting -------------------------------------------------------

    def fully_ready(self) -> bool:
        return all(p.fully_consuming() for p in self.pools.values() if not p.removed)

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: (ready, one-line reason)."""
        if self.draining:
            return False, "draining: workqd is stopping"
        for name, pool in self.pools.items():
            if not pool.removed and pool.consuming() == 0:
                return False, f"queue {name}: no worker is consuming"
        if self.poller is not None and not self.poller.connected:
            return False, "broker not reachable from the master"
        return True, "ready"

    def healthy(self) -> bool:
        return time.monotonic() - self.last_loop < 10 and all(
            p.state != FATAL for p in self.pools.values())

    def status_text(self) -> str:
        procs = [w for p in self.pools.values() for w in p.procs.values()]
        consuming = sum(1 for w in procs if w.slot.consuming)
        busy = sum(1 for w in procs if w.slot.state == BUSY)
        size = sum(p.queue.workers for p in self.pools.values() if not p.removed)
        done = redelivered = 0
        for pool in self.pools.values():
            c = pool.counters()
            done += sum(c[w] for w in OUTCOME_WORDS)
            redelivered += c[W_REDELIVERED]
        text = f"{consuming}/{size} workers, {busy} busy, {done} done, {redelivered} redelivered"
        if self.draining:
            return f"stopping: {text}"
        return f"reloading: {text}" if self.reloading else text

    def report(self, now: float) -> None:
        if not self.draining and self.fully_ready():
            if not self.ready_sent:
                self.ready_sent = True
                log.info("ready: every worker is consuming (%.2fs after start)",
                         now - self.started)
                self.notifier.ready(self.status_text())
            elif self.reloading:
                self.reloading = False
                log.info("reload complete")
                self.notifier.ready(self.status_text())
        elif (self.reloading and not self.draining
              and now - self.reload_started >= RELOAD_READY_TIMEOUT):
            self.reloading = False
            log.warning("reload: the new workers are not all consuming after %gs; reporting the "
                        "reload done (old workers keep serving until new ones take over)",
                        RELOAD_READY_TIMEOUT)
            self.notifier.ready(self.status_text())
        if self.healthy():
            self.notifier.watchdog()
        self.notifier.status(self.status_text(), now)

    def stop_services(self) -> None:
        if self.poller is not None:
            self.poller.stop()
        if self.http is not None:
            self.http.stop()
