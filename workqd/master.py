"""The master: keeps the pools at size, answers systemd and Prometheus, runs no task code.

``run`` reads like the arbiter it is modelled on: wait on the selector (signals,
worker wake-ups, HTTP clients, the poller's reports) with a deadline, handle
what arrived, reap, keep the pools full, report. The master has one thread,
always: it forks workers and the queue poller, and a fork from a process with
other threads can deadlock the child on a lock one of them held. Whatever
blocks (the broker) lives in the poller process; whatever is slow or hostile
(HTTP clients) is served non-blocking from this loop with a budget (httpd.py).
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time
from typing import Callable

from . import __version__, commands, control, exitcodes, forks, logsetup, phases, reloadplan
from . import service
from . import state
from . import config as config_mod
from .cancels import CancelTable
from .control import ControlServer, ProtocolError
from .httpd import HttpServer, Request, Response
from .metrics import Exposition, compress, gzip_accepted
from .notify import Notifier
from .poller import PollerProcess
from .pool import FATAL, Pool
from .signals import SignalQueue, signame
from .slots import OUTCOME_WORDS, W_REDELIVERED, WAITS_TOKEN, NoFreeSlot, SlotTable, Totals
from .vocab import RESTART_REASONS

log = logging.getLogger("workqd.master")

LOOP_TIMEOUT = 1.0       # the loop turns at least this often, signals or not
STARTING_TIMEOUT = 0.05  # while not ready yet, so READY goes out promptly
# A reload whose new workers never consume (e.g. an unreachable new broker) must
# not leave systemd in "reloading" forever; below the unit's TimeoutStartSec.
RELOAD_READY_TIMEOUT = 20.0
NUDGE_EVERY = 1.0        # seconds between asks for a depth sample of a new queue
REAP_AFTER_KILL = 5.0    # the last net: seconds to wait for KILLed children to be reaped


class Master:
    """``slots``, ``clock``, ``waitpid``, ``spawn``, ``kill``, ``poller`` and ``load_config``
    are the seams to the operating system: the defaults are the real ones, a test
    runs the same decisions with fakes and no process."""

    def __init__(self, cfg: config_mod.Config, *, slots: SlotTable | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 waitpid: Callable[[int, int], tuple[int, int]] = os.waitpid,
                 spawn: Callable | None = None, kill: Callable[[int, int], None] = os.kill,
                 poller=None, load_config: Callable = config_mod.load):
        self.cfg = cfg
        self.pid = os.getpid()
        self.phase = state.STARTING
        self.clock, self.waitpid, self.spawn, self.kill = clock, waitpid, spawn, kill
        self.load_config = load_config
        self.sel = selectors.PollSelector()   # stateless in the kernel: nothing shared on fork
        self.signals = SignalQueue()
        self.slots = slots or SlotTable()
        self.totals = Totals()
        self.pools: dict[str, Pool] = {}
        self._orphans: list[Pool] = []  # pools removed and re-added while still draining
        self._pool_ids: dict[str, int] = {}   # stable per queue name, so totals survive reloads
        self._restarts: dict[int, dict[str, int]] = {}  # by pool id, for the same reason
        self.notifier = Notifier()
        self.exposition = Exposition()
        self.http: HttpServer | None = None
        self.control: ControlServer | None = None
        # Mapped before any fork: the poller fills it, every worker reads it.
        self.cancels = CancelTable()
        self.poller = poller or PollerProcess(cfg, self.close_in_child, self.cancels)
        self.stop_deadline = 0.0
        self.exit_code = exitcodes.OK
        self.started = clock()
        self.last_loop = clock()
        self.reload_started = 0.0
        self._last_nudge = 0.0
        # queue -> (the config it is judged for, is the broker serving it?)
        self._service: dict[str, tuple[config_mod.Queue, service.ServiceJudge]] = {}
        self._rounds_seen = 0
        self._broker_seen = False     # the poller's last word on the broker, for BROKER_UP/DOWN
        self._spawn_blocked = ""      # why spawning waits (logged once), "" when it does not
        self.refused_moves = 0        # phase moves not in state.PHASES (a bug; logged)

    def enter(self, phase: str) -> None:
        """Move to ``phase`` along state.PHASES; a move not in the table is a bug, logged
        and refused rather than raised, so it cannot take the service down."""
        if phase != self.phase:
            if phase not in state.PHASES[self.phase]:
                self.refused_moves += 1
                log.error("master: no transition %s -> %s (a workqd bug); staying %s",
                          self.phase, phase, self.phase)
                return
            self.phase = phase

    def dispatch(self, event: str, **data):
        """Do what phases.TABLE says ``event`` means in the current phase."""
        return getattr(self, f"do_{phases.decide(self.phase, event)}")(event, **data)

    # --- the loop --------------------------------------------------------

    def run(self) -> int:
        """Exceptions from ``start`` reach the caller ("cannot start"); once the loop
        runs, anything unexpected ends in ``stop_after_bug``: workers stopped in
        order, exit status INTERNAL_ERROR, never an orphan."""
        try:
            self.start()
        except BaseException:
            self.stop_children()   # the poller may be forked already
            raise
        try:
            # The first turn, which forks the workers, does not wait for the first tick.
            timeout = 0.0
            while True:
                for key, mask in self.sel.select(timeout):
                    key.data(mask)
                now = self.clock()
                if self.turn(now, self.signals.received()):
                    break
                self.http.expire(now)
                self.control.expire(now)
                timeout = STARTING_TIMEOUT if self.phase == state.STARTING else LOOP_TIMEOUT
        except Exception:
            return self.stop_after_bug()
        self.stop_services()
        log.info("stopped")
        return self.exit_code

    def turn(self, now: float, signals: list[int]) -> bool:
        """One turn of the loop after the wait; True once stopping is complete."""
        self.last_loop = now
        for sig in signals:
            self.handle_signal(sig)
        self.reap_children(now)
        if self.phase == state.STOPPING:
            if not self.live_pools_have_workers():
                return True
            if now >= self.stop_deadline:
                self.retire_workers("shutdown", signal.SIGKILL)
            self.notifier.extend_timeout(now)
        else:
            self.manage_pools(now)
            self.poller.manage(now)
        if self.poller.connected != self._broker_seen:
            self._broker_seen = self.poller.connected
            self.dispatch(phases.BROKER_UP if self._broker_seen else phases.BROKER_DOWN)
        self.report(now)
        return False

    def stop_after_bug(self) -> int:
        """The last net: a bug in the loop is logged once, with its traceback; the
        workers get TERM, KILL after shutdown_timeout, and are reaped before exit."""
        log.exception("internal error in the master loop (a workqd bug, please report it); "
                      "stopping: workers get TERM, then KILL after %gs",
                      self.cfg.shutdown_timeout)
        self.phase = state.STOPPING   # not enter(): nothing of the loop's may run again
        try:
            self.notifier.stopping()
        except Exception:
            pass
        self.stop_children()
        try:
            self.stop_services()
        except Exception:
            pass
        log.info("stopped after an internal error")
        return exitcodes.INTERNAL_ERROR

    def stop_children(self) -> None:
        """Every child (workers, the poller) gets TERM, then KILL after shutdown_timeout;
        returns once all are reaped (or REAP_AFTER_KILL passed). Uses nothing but the
        process table, so it works whatever state the loop was left in."""
        pids = {p.pid for pool in [*self.pools.values(), *self._orphans]
                for p in list(pool.procs.values())}
        if self.poller.pid:
            pids.add(self.poller.pid)
        for sig, wait in ((signal.SIGTERM, self.cfg.shutdown_timeout),
                          (signal.SIGKILL, REAP_AFTER_KILL)):
            for pid in pids:
                try:
                    self.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                try:
                    pid, _ = self.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid:
                    pids.discard(pid)
                else:
                    time.sleep(0.05)
            if not pids:
                return

    def start(self) -> None:
        for warning in self.cfg.warnings:
            log.warning("%s", warning)
        self.signals.install()
        self.sel.register(self.signals.read_fd, selectors.EVENT_READ, _nothing)
        self.sel.register(self.signals.wake_r, selectors.EVENT_READ,
                          lambda mask: self.signals.clear_wakes())
        # Binds at once: a taken port stops workqd before anything is forked.
        self.http = HttpServer(self.sel, self.cfg.metrics_listen, self.serve_http,
                               tls=self.cfg.metrics_tls, basic_auth=self.cfg.metrics_basic_auth)
        # Likewise: a live daemon on the same socket stops this one before any fork.
        self.control = ControlServer(
            self.sel, control.server_path(self.cfg.control_socket, self.cfg.path),
            self.serve_control)
        forks.settle()   # everything the children inherit is built by now
        self.poller.start(self.sel)
        for queue in self.cfg.queues:
            self.add_pool(queue)
        log.info("workqd %s started (pid %d): %s; metrics on http://%s:%d/metrics",
                 __version__, self.pid, ", ".join(f"{q.name}: {q.workers} workers"
                                                 for q in self.cfg.queues),
                 *self.cfg.metrics_listen)
        log.info("control socket: %s", self.control.path)

    def live_pools_have_workers(self) -> bool:
        return any(p.procs for p in [*self.pools.values(), *self._orphans])

    # --- signals ---------------------------------------------------------

    def handle_signal(self, sig: int) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            event = phases.SIG_STOP
        else:
            event = {signal.SIGQUIT: phases.SIG_QUIT, signal.SIGHUP: phases.SIG_HUP,
                     signal.SIGCHLD: phases.SIG_CHLD}.get(sig, phases.SIG_OTHER)
        self.dispatch(event, sig=sig)

    def do_nothing(self, event: str, **data) -> None:
        """SIGCHLD (reap_children runs every turn), and events a phase has no use for."""

    def do_stop(self, event: str, sig: int) -> None:
        self.begin_stop(f"{signame(sig)} received")

    def do_stop_now(self, event: str, sig: int) -> None:
        log.warning("second %s: stopping at once, cutting running tasks "
                    "(the broker requeues them)", signame(sig))
        self.retire_workers("shutdown", signal.SIGKILL)

    def do_quit(self, event: str, sig: int) -> None:
        log.warning("SIGQUIT: stopping at once")
        self.begin_stop("SIGQUIT received")
        self.retire_workers("shutdown", signal.SIGKILL)

    def do_ignore_signal(self, event: str, sig: int) -> None:
        log.info("%s ignored (workqd acts on TERM, INT, QUIT and HUP)", signame(sig))

    def do_ignore_reload(self, event: str, sig: int) -> None:
        log.info("SIGHUP ignored: workqd is stopping")

    def begin_stop(self, why: str, exit_code: int = exitcodes.OK) -> None:
        if self.phase == state.STOPPING:
            return
        self.enter(state.STOPPING)
        self.exit_code = exit_code
        self.stop_deadline = self.clock() + self.cfg.shutdown_timeout
        self.notifier.stopping()
        busy = sum(1 for p in self.pools.values() for w in p.procs.values() if w.slot.busy)
        log.info("%s: stopping; %d running task(s) get up to %gs to finish", why, busy,
                 self.cfg.shutdown_timeout)
        self.retire_workers("shutdown", signal.SIGTERM)
        self.poller.stop()

    def retire_workers(self, reason: str, sig: int) -> None:
        for pool in [*self.pools.values(), *self._orphans]:
            pool.retire_workers(reason, sig)

    # --- reload ----------------------------------------------------------

    def do_reload(self, event: str, sig: int = signal.SIGHUP) -> None:
        """Up and serving: new workers start, old ones leave as they take over."""
        self.notifier.reloading()
        plan = self.read_new_config()
        if plan is None:
            self.notifier.ready(self.status_text(self.snapshot()))
            return
        self.apply_plan(plan, at_once=False)
        self.enter(state.RELOADING)
        self.reload_started = self.clock()
        log.info("reload: new config from %s applied; replacing workers gradually",
                 plan.config.path)

    def do_reload_at_start(self, event: str, sig: int = signal.SIGHUP) -> None:
        """Still starting: apply the new config and replace the starting workers at once
        (why: phases.TABLE). systemd has not heard READY, so it hears no RELOADING."""
        plan = self.read_new_config()
        if plan is None:
            return
        self.apply_plan(plan, at_once=True)
        log.info("reload during start: new config from %s applied; the starting workers "
                 "are replaced at once, ready once the new ones consume", plan.config.path)

    def reload(self) -> None:
        self.dispatch(phases.SIG_HUP, sig=signal.SIGHUP)

    def read_new_config(self) -> reloadplan.Plan | None:
        """The plan for the file's config; None when the file is refused."""
        try:
            new = self.load_config(self.cfg.path)
        except config_mod.ConfigError as e:
            for line in e.problems:
                log.error("reload refused, keeping the running config: %s", line)
            return None
        except Exception as e:  # a bug in loading must not take the running daemon down
            log.error("reload refused, keeping the running config: %s: %s",
                      type(e).__name__, e)
            return None
        for warning in new.warnings:
            log.warning("%s", warning)
        views = {name: reloadplan.PoolView(name, pool.size, pool.removed)
                 for name, pool in self.pools.items()}
        plan = reloadplan.plan_reload(self.cfg, new, views)
        if plan.kept_metrics:
            log.warning("reload: metrics settings change only on restart; keeping %s:%d",
                        *self.cfg.metrics_listen)
        if plan.kept_control_socket:
            log.warning("reload: control.socket changes only on restart; keeping %s",
                        self.control.path if self.control else self.cfg.control_socket)
        return plan

    def apply_plan(self, plan: reloadplan.Plan, at_once: bool) -> None:
        """Pools follow the plan; ``at_once``: the old workers get TERM now instead of
        leaving one by one as their replacements consume."""
        new = plan.config
        for step in plan.steps:
            if step.kind == reloadplan.REMOVE:
                log.info("reload: queue %s removed; its workers finish their tasks and leave",
                         step.name)
                pool = self.pools[step.name]
                pool.removed = True
                pool.retire_workers("removed")
            elif step.kind in (reloadplan.ADD, reloadplan.READD):
                if step.kind == reloadplan.READD:
                    # Re-added while the old one's workers drain: let them drain apart.
                    self._orphans.append(self.pools.pop(step.name))
                self.add_pool(step.queue, new)
                log.info("reload: queue %s added with %d workers", step.name,
                         step.queue.workers)
            else:
                pool = self.pools[step.name]
                if at_once:
                    pool.retire_workers("reload")
                else:
                    for proc in list(pool.procs.values()):
                        pool.retire(proc, "reload")
                pool.queue, pool.broker, pool.log_level = step.queue, new.broker, new.log_level
                if step.was != step.queue.workers:
                    log.info("reload: queue %s back to the config's %d workers (was scaled to "
                             "%d)", step.name, step.queue.workers, step.was)
                pool.size = step.queue.workers   # a pause survives the reload, a scale does not;
                # an autoscaled pool starts again from its min
        self.cfg = new
        self.configure_logging(new.log_level, f"master (pid {self.pid})", new.log_format)
        self.poller.reconfigure(new)

    configure_logging = staticmethod(logsetup.configure)

    def add_pool(self, queue: config_mod.Queue, cfg: config_mod.Config | None = None) -> Pool:
        cfg = cfg or self.cfg
        pool_id = self._pool_ids.setdefault(queue.name, len(self._pool_ids) + 1)
        restarts = self._restarts.setdefault(pool_id, dict.fromkeys(RESTART_REASONS, 0))
        pool = Pool(queue=queue, pool_id=pool_id, restarts=restarts, broker=cfg.broker,
                    slots=self.slots, totals=self.totals, wake_fd=self.signals.wake_w,
                    log_level=cfg.log_level, child_init=self.close_in_child,
                    spawn=self.spawn, kill=self.kill, cancels=self.cancels)
        self.pools[queue.name] = pool
        return pool

    def close_in_child(self) -> None:
        """Runs in a freshly forked child: drop what belongs to the master."""
        self.signals.close_in_child()
        if self.http is not None:
            self.http.close_in_child()
        if self.control is not None:
            self.control.close_in_child()
        for fd in self.poller.fds():
            os.close(fd)

    # --- children ----------------------------------------------------------

    def reap_children(self, now: float) -> None:
        while True:
            try:
                pid, status = self.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.poller.pid:
                self.dispatch(phases.POLLER_EXIT, pid=pid, status=status, now=now)
                continue
            for pool in [*self.pools.values(), *self._orphans]:
                proc = pool.procs.get(pid)
                if proc is not None:
                    self.dispatch(phases.WORKER_EXIT, pool=pool, proc=proc, status=status,
                                  now=now)
                    break
            else:
                log.debug("reaped unknown child %d", pid)

    def do_account_exit(self, event: str, pool: Pool, proc, status: int, now: float) -> None:
        pool.on_exit(proc, status, now)

    def do_replace_poller(self, event: str, pid: int, status: int, now: float) -> None:
        log.log(logging.INFO if os.WIFSIGNALED(status) else logging.WARNING,
                "queue poller (pid %d) ended; replacing it", pid)
        self.poller.on_exit(now)

    def do_poller_gone(self, event: str, pid: int, status: int, now: float) -> None:
        self.poller.on_exit(now)   # stopping: it was asked to end, it is not replaced

    def manage_pools(self, now: float) -> None:
        blocked = ""
        for name, pool in list(self.pools.items()):
            pool.note_progress()
            if pool.state == FATAL:
                self.dispatch(phases.POOL_FATAL, name=name, pool=pool)
                return
            depth = self.poller.depth.get(name)
            pool.autoscale(now, depth[0] if depth else None)
            trouble = pool.spawn_workers(now)
            if isinstance(trouble, NoFreeSlot):
                blocked = str(trouble)
                self.dispatch(phases.SLOTS_FULL, name=name, why=blocked)
            elif trouble is not None:
                blocked = f"fork failed: {trouble.strerror or trouble}"
                self.dispatch(phases.FORK_FAILED, name=name, why=blocked)
            pool.retire_surplus()
            pool.follow_workers(now)
            if pool.removed and not pool.procs:
                del self.pools[name]
            elif (pool.consuming() and name not in self.poller.depth
                  and now - self._last_nudge >= NUDGE_EVERY):
                self._last_nudge = now
                self.poller.nudge()   # its queue exists now: sample it without waiting
        self._orphans = [p for p in self._orphans if p.procs]
        for pool in self._orphans:
            pool.retire_surplus()
            pool.follow_workers(now)
        if self._spawn_blocked and not blocked:
            log.info("workers can be started again")
            self._spawn_blocked = ""
        if self.poller.rounds != self._rounds_seen:
            self._rounds_seen = self.poller.rounds
            self.judge_service()

    def do_fail(self, event: str, name: str, pool: Pool) -> None:
        log.error("pool %s cannot stay up: %s; stopping workqd", name, pool.fatal_reason)
        self.begin_stop(f"pool {name} failed", exitcodes.POOL_FAILED)

    def do_defer_spawn(self, event: str, name: str, why: str) -> None:
        """Logged once until spawning works again; the next turn tries again."""
        if not self._spawn_blocked:
            log.error("queue %s: cannot start a worker: %s; trying again as workers leave",
                      name, why)
        self._spawn_blocked = why

    def do_note_broker(self, event: str) -> None:
        log.debug("master: %s", event)

    def judge_service(self) -> None:
        """After each poll: does the broker serve every queue our workers consume?"""
        for name, pool in self.pools.items():
            q = pool.queue
            judged_for, judge = self._service.get(name, (None, None))
            if judge is None or judged_for is not q:   # a new queue, or a reload changed it
                judge = service.ServiceJudge(starvation_applies=not q.idle_consumers_expected)
                self._service[name] = (q, judge)
            change = judge.observe(_service_sample(pool, self.poller.depth.get(name)))
            if change == "lost":
                log.warning("queue %s: %s: the broker does not serve it (a quorum queue "
                            "without a quorum, or its node is down)", name, judge.sign)
            elif change == "back":
                log.info("queue %s: the broker serves it again", name)
        for name in set(self._service) - set(self.pools):
            del self._service[name]   # removed by a reload

    # --- reporting -------------------------------------------------------

    def snapshot(self, counters: bool = True) -> state.Snapshot:
        """Everything the endpoints and STATUS report, consistent within itself
        (without the task counters when ``counters`` is False: state.take_snapshot)."""
        now = self.clock()
        return state.take_snapshot(
            self.phase, [*self.pools.values(), *self._orphans], self.poller.depth,
            self._unserved_sign, self._queue_state, self.poller.connected,
            now - self.last_loop, __version__, now, delayed=self.poller.delayed,
            cancels=self.poller.cancels_held, schedules=self.poller.schedules,
            counters=counters)

    def _forget_churn(self, name: str) -> None:
        _, judge = self._service.get(name, (None, None))
        if judge is not None:
            judge.forget_churn()

    def _unserved_sign(self, name: str) -> str:
        _, judge = self._service.get(name, (None, None))
        return judge.sign if judge is not None and judge.unserved else ""

    def _queue_state(self, pool: Pool) -> str:
        if pool.state == FATAL:
            return state.Q_FAILED
        if self.phase == state.STOPPING:
            return state.Q_DRAINING
        return state.Q_PAUSED if pool.paused else state.Q_RUNNING

    # --- the control socket (workqctl) ---------------------------------------

    # Control commands that steer the pools: command -> method.
    STEERING = {"pause": "ctl_pause", "resume": "ctl_resume", "quiet": "ctl_quiet",
                "scale": "ctl_scale"}

    def serve_control(self, req: dict) -> dict:
        """One workqctl request (control.py has parsed and checks the envelope)."""
        cmd = req["cmd"]
        if cmd in ("status", "schedules"):
            return self.dispatch(phases.STATUS, req=req)
        if cmd in self.STEERING:
            return self.dispatch(phases.STEER, req=req)
        raise ProtocolError(f"unknown command {cmd!r} (status, schedules, pause, resume, quiet, "
                            f"scale)")

    def do_serve(self, event: str, req):
        if event == phases.HTTP:
            return self.answer_http(req)
        # Neither answer shows task counters: the snapshot skips summing them.
        snap = self.snapshot(counters=False)
        if req["cmd"] == "schedules":
            return {"ok": True, **commands.schedules(
                snap, self.pid, [(s.name, s.queue) for s in self.cfg.schedules])}
        return {"ok": True, **commands.status(snap, req.get("queue"), self.pid,
                                              self.control.path if self.control else "")}

    def do_steer(self, event: str, req: dict) -> dict:
        return getattr(self, self.STEERING[req["cmd"]])(req)

    def do_refuse_steering(self, event: str, req: dict) -> dict:
        raise ProtocolError("workqd is stopping")

    def ctl_pause(self, req: dict) -> dict:
        return self._pause_or_resume(req, pause=True)

    def ctl_resume(self, req: dict) -> dict:
        return self._pause_or_resume(req, pause=False)

    def _pause_or_resume(self, req: dict, pause: bool) -> dict:
        names = self._queue_names(req, optional=not pause)
        for name in names:
            pool = self.pools[name]
            if pool.paused != pause:
                pool.set_paused(pause)
                self._forget_churn(name)
                log.info("control: queue %s %s", name,
                         "paused: consumers cancelled, running tasks finish"
                         if pause else "resumed")
        return {"ok": True, "queues": names}

    def ctl_quiet(self, req: dict) -> dict:
        names = [n for n, p in self.pools.items() if not p.removed]
        for name in names:
            if not self.pools[name].paused:
                self.pools[name].set_paused(True)
                self._forget_churn(name)
        log.info("control: quiet: every queue paused; running tasks finish, workqd stays up")
        return {"ok": True, "queues": names}

    def ctl_scale(self, req: dict) -> dict:
        (name,) = self._queue_names(req, optional=False)
        n = req.get("workers")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n:
            raise ProtocolError(f"workers must be a whole number from 1, got {n!r} "
                                f"(to stop taking tasks: pause)")
        # As the config counts: each other queue at the most it may reach (an
        # autoscaled one grows to its max by itself), and this one too.
        total = sum(_most_workers(p) for q, p in self.pools.items()
                    if q != name and not p.removed)
        pool = self.pools[name]
        mine = max(n, pool.queue.autoscale.max) if pool.queue.autoscale else n
        if total + mine > config_mod.MAX_TOTAL_WORKERS:
            raise ProtocolError(f"at most {config_mod.MAX_TOTAL_WORKERS} workers in all; "
                                f"the other queues may have {total}")
        old, pool.size = pool.size, n
        retired = pool.shrink()
        log.info("control: queue %s scaled from %d to %d workers (%d asked to leave; "
                 "the config's %d return on reload)", name, old, n, retired,
                 pool.queue.workers)
        return {"ok": True, "queue": name, "workers": n, "was": old}

    def _queue_names(self, req: dict, optional: bool) -> list[str]:
        name = req.get("queue")
        live = [n for n, p in self.pools.items() if not p.removed]
        if name is None and optional:
            return live
        if not isinstance(name, str) or name not in live:
            raise ProtocolError(f"no queue {name!r} in this daemon (queues: {', '.join(live)})")
        return [name]

    def serve_http(self, req: Request) -> Response:
        return self.dispatch(phases.HTTP, req=req)

    def answer_http(self, req: Request) -> Response:
        snap = self.snapshot()
        if req.path == "/metrics":
            body, content_type = self.exposition.render(snap, req.headers.get("accept"))
            if gzip_accepted(req.headers.get("accept-encoding")):
                return Response(200, compress(body), content_type,
                                (("Content-Encoding", "gzip"), ("Vary", "Accept, Accept-Encoding")))
            return Response(200, body, content_type, (("Vary", "Accept, Accept-Encoding"),))
        if req.path == "/healthz":
            ok = snap.healthy()
            return Response(200 if ok else 503,
                            b"ok\n" if ok else b"master loop stalled or pool failed\n")
        if req.path == "/readyz":
            ok, reason = snap.readiness()
            return Response(200 if ok else 503, f"{reason}\n".encode())
        return Response(404, b"not found: try /metrics, /healthz or /readyz\n")

    def fully_ready(self) -> bool:
        return all(p.fully_consuming() for p in self.pools.values() if not p.removed)

    @staticmethod
    def status_text(snap: state.Snapshot) -> str:
        consuming = sum(q.consuming for q in snap.queues)
        busy = sum(1 for q in snap.queues for w in q.workers if w.state == state.W_BUSY)
        size = sum(q.size for q in snap.queues)
        done = sum(q.counters[w] for q in snap.queues for w in OUTCOME_WORDS)
        redelivered = sum(q.counters[W_REDELIVERED] for q in snap.queues)
        text = f"{consuming}/{size} workers, {busy} busy, {done:.0f} done, " \
               f"{redelivered:.0f} redelivered"
        paused = [q.name for q in snap.queues if q.paused]
        if paused and len(paused) == len(snap.queues) and len(paused) > 1:
            text += "; quiet: every queue paused"
        elif paused:
            text += f"; paused: {', '.join(paused)}"
        if snap.phase == state.STOPPING:
            return f"stopping: {text}"
        return f"reloading: {text}" if snap.phase == state.RELOADING else text

    def report(self, now: float) -> None:
        if self.fully_ready():
            self.dispatch(phases.ALL_CONSUMING, now=now)
        elif now - self.reload_started >= RELOAD_READY_TIMEOUT:
            self.dispatch(phases.RELOAD_OVERDUE, now=now)
        if self.notifier.wants_report(now):   # never without systemd; at most 1/s with it
            snap = self.snapshot()
            if snap.healthy():
                self.notifier.watchdog()
            self.notifier.status(self.status_text(snap), now)

    def do_announce_ready(self, event: str, now: float) -> None:
        log.info("ready: every worker is consuming (%.2fs after start)", now - self.started)
        self._announce()

    def do_reload_done(self, event: str, now: float) -> None:
        log.info("reload complete")
        self._announce()

    def do_reload_late(self, event: str, now: float) -> None:
        log.warning("reload: the new workers are not all consuming after %gs; reporting the "
                    "reload done (old workers keep serving until new ones take over)",
                    RELOAD_READY_TIMEOUT)
        self._announce()

    def _announce(self) -> None:
        self.enter(state.READY)
        self.notifier.ready(self.status_text(self.snapshot()))

    def stop_services(self) -> None:
        self.poller.stop()
        if self.http is not None:
            self.http.stop()
        if self.control is not None:
            self.control.stop()


def _service_sample(pool: Pool, depth) -> service.Sample | None:
    if depth is None:
        return None
    procs = [p for p in pool.procs.values() if p.slot.consuming]
    return service.Sample(
        ready=depth[0], broker_consumers=depth[1], consuming=len(procs),
        # A worker holding a task until a rate token comes is not idle.
        idle=sum(1 for p in procs if not p.slot.busy and not p.slot.limit & WAITS_TOKEN),
        progress=frozenset((p.pid, p.slot.tasks_done, p.slot.busy) for p in pool.procs.values()),
        subscriptions=frozenset((p.pid, p.slot.subscriptions) for p in pool.procs.values()))


def _most_workers(pool: Pool) -> int:
    """The most workers a pool may run: its size, or its autoscale max if larger."""
    return max(pool.size, pool.queue.most_workers if pool.queue.autoscale else pool.size)


def _nothing(mask) -> None:
    """The signal pipe is drained by the loop itself (SignalQueue.received)."""
