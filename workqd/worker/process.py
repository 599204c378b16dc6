"""A worker process: one broker session at a time, one handler thread, one slot.

Built in the master before fork; ``run()`` is the child's whole life. The main
thread runs the connection's I/O loop and never runs task code, so heartbeats
flow while a handler works for hours. The handler thread (handler.py) runs the
tasks; the session (session.py) is rebuilt per connection; the settler
(settle.py) turns outcomes into acks and confirmed copies on the channel a
delivery came from.

Thread ownership: every attribute of ``Worker`` belongs to the I/O thread. The
slot's connection state, draining flag and settlement counters are written
here; its busy word and message id by the handler thread only (slots.py), which
also raises the draining flag as it begins a recycling worker's last task. At
prefetch 1 the handler thread also counts a success and writes its ack frame
itself (settle.py, ``ack_from_handler``); the I/O thread settles the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import struct
import time

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from .. import cancels, delays, exitcodes, frames, logsetup, runner, vocab
from ..broker import Failover, redact
from ..cancels import CancelTable
from ..config import Broker, Queue
from ..slots import CONNECTING, IMPORTING, LIMITED, PAUSED, Slot, message_digest
from . import intake, timing
from .handler import HandlerThread
from .intake import Delivery
from .limits import Limits
from .policy import decide, postpone
from .publisher import Publisher
from .session import CONSUMER_CHECK_EVERY, Session, Verdict

log = logging.getLogger("workqd.worker")

TICK = 0.25    # seconds between liveness ticks and Python-handler timeout checks
# Before its first connection a worker waits this long at most for the host's
# poller to have read the cancel log once, so it does not run a task cancelled
# while this daemon was down, and to have declared the delay levels; past it,
# cancels reach it as they are read, and it declares the levels itself.
CANCELS_WAIT = 5.0
CANCELS_LOOK = 0.05   # seconds between looks meanwhile


class Worker:
    def __init__(self, number: int, queue: Queue, broker: Broker, slot: Slot, wake_fd: int,
                 log_level: str, cancels: CancelTable | None = None):
        self.number = number
        self.queue = queue
        self.broker = broker
        self.slot = slot
        self.wake_fd = wake_fd
        self.log_level = log_level
        self.name = f"{queue.name}#{number}"
        # Workers of one pool start on different nodes, so losing a node costs a
        # share of the capacity, not all of it.
        self._failover = Failover(broker.urls, start=number - 1)
        self._ack_batch = 1 if queue.prefetch == 1 else max(1, (queue.prefetch or 200) // 2)
        self._recycles = bool(queue.max_tasks_per_worker or queue.max_memory_per_worker)
        self._session: Session | None = None
        self._handler: HandlerThread | None = None
        self._ioloop: IOLoop | None = None
        self._stopping = False
        self._exit_code: int | None = None
        self._received = 0        # deliveries handed to the handler thread
        self._next_consumer_check = 0.0
        self._cancels = cancels   # the master's table, read here, written by its poller
        self._cancels_deadline = 0.0   # until when the first connection waits for it
        self._stopping_cancelled: Delivery | None = None   # its command is being stopped
        self._run = None          # the handler's runner (a command's can be stopped)
        # The queue's cluster-wide limits on the current connection (None: no limits).
        self._gate: Limits | None = None
        self._rated = bool(queue.limits.rate)

    # --- life cycle --------------------------------------------------------

    def run(self) -> int:
        """Runs in the forked child; returns the exit status."""
        self.pid = os.getpid()
        self._master_pid = os.getppid()
        logsetup.configure(self.log_level, f"worker {self.name} (pid {self.pid})")
        logsetup.name_process("workqd-worker")
        self.slot.set_pid(self.pid)
        self.slot.tick()
        # While importing, the master applies import_timeout, not its hang clock:
        # an import runs no I/O loop that could tick.
        self.slot.set_state(IMPORTING)
        try:
            run = runner.load(self.queue.handler, self.queue.timeout, self.queue.timeout_grace)
        except runner.BootError as e:
            log.error("%s", e)
            return exitcodes.WORKER_BOOT_ERROR
        self._run = run
        self.slot.tick()
        self.slot.set_state(CONNECTING)
        self._cancels_deadline = time.monotonic() + CANCELS_WAIT
        # Before any connection: a header pika cannot decode must reach intake as a
        # malformed task, not abort the connection and come back for ever (frames.py).
        frames.install()
        self._ioloop = IOLoop()
        self._publisher = Publisher(self.broker, self.broker.urls,
                                    f"workqd {self.name} pid {self.pid}", self._ioloop,
                                    self._on_blocked, self.queue.allow_reply_queues,
                                    on_idle=self._on_publisher_idle)
        self._handler = HandlerThread(run, self.slot, self.queue.timeout, self._wake_master,
                                      self._cancelled_at if self._cancels is not None else None)
        # A queue with limits asks the handler to be told of every result: its gate
        # reads the handler's idleness to release a concurrency slot.
        self._handler.wake_always = bool(self.queue.limits.any)
        self._ioloop.add_handler(self._handler.wake_fd, self._on_results, IOLoop.READ)
        self._install_signals()
        self._handler.start()
        self._ioloop.add_callback_threadsafe(self._connect)
        self._ioloop.call_later(TICK, self._tick)
        self._ioloop.start()
        return self._exit_code if self._exit_code is not None else exitcodes.WORKER_OK

    def _install_signals(self) -> None:
        # The handlers do nothing: the C-level handler writes the signal number to
        # the wakeup pipe, and the I/O loop reads it there, outside any handler.
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        # Ctrl-C reaches the whole process group: the master decides what it means.
        # Empty handlers, not SIG_IGN, so command handlers exec'd from here start
        # with default dispositions.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, _no_op)
        self._ioloop.add_handler(r, self._guard(self._on_signal_pipe), IOLoop.READ)

    def _on_signal_pipe(self, fd, events) -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        if signal.SIGTERM in data:
            if not self._stopping:
                log.info("stopping: finishing the running task, taking no new ones")
            self.stop(exitcodes.WORKER_OK)

    def stop(self, exit_code: int, requeue_buffered: bool = True, flag: bool = True) -> None:
        """Stop taking tasks, settle what runs, then close and leave with ``exit_code``.

        The draining flag makes the master start a replacement at once (unless
        it is stopping everything), so capacity does not wait for this exit.
        ``flag=False``: the handler thread raises it (a recycling worker's last task).
        """
        if self._exit_code is None:
            self._exit_code = exit_code
        if not self._stopping:
            self._stopping = True
            # Every result counts now: the worker leaves once the last one is settled.
            self._handler.wake_always = True
            if flag:
                self.slot.set_draining()
                self._wake_master()
            if self._session is not None:
                self._session.stop_consuming()
            if self._gate is not None:
                self._gate.stop_generating()
            if requeue_buffered:
                waiting = self._gate.take_waiting() if self._gate is not None else []
                for d in [*waiting, *self._handler.take_unstarted()]:
                    d.settler.requeue(d)
        if self._handler.results:
            self._settle_results()
        self._finish_if_idle()

    def _finish_if_idle(self) -> None:
        """The one place that ends a stopping worker: once nothing is owed to the broker."""
        if not self._stopping or self._handler.busy():
            return
        s = self._session
        if s is not None and s.settler is not None and s.settler.usable:
            if s.settler.pending:
                return
            s.settler.flush()
        if not self._publisher.idle and s is not None and s.settler is not None \
                and s.settler.usable:
            return   # a --wait reply still on its way
        self._publisher.close()
        if s is not None and s.connection is not None and s.connection.is_open:
            s.close()   # _on_closed stops the loop
        elif s is None or s.connection is None or s.connection.is_closed:
            self._ioloop.stop()

    def _on_blocked(self, blocked: bool) -> None:
        """Publisher event: the broker blocks (or unblocks) our publishing connection."""
        self.slot.set_blocked(blocked)
        self._wake_master()

    def _on_publisher_idle(self) -> None:
        """Publisher event: nothing waits to be sent or confirmed any more."""
        if self._stopping:
            self._finish_if_idle()

    def _wake_master(self) -> None:
        try:
            os.write(self.wake_fd, b"w")
        except OSError:
            pass  # the pipe is full (the master will look anyway) or the master is gone

    def _guard(self, callback):
        """Nothing raised by workqd code may escape into pika's loop: log it and stop."""
        def guarded(*args):
            try:
                callback(*args)
            except Exception:
                log.exception("internal error in %s; stopping this worker",
                              getattr(callback, "__name__", "callback"))
                self.stop(exitcodes.WORKER_CRASH)
        return guarded

    # --- sessions ------------------------------------------------------------

    def _connect(self) -> None:
        if self._stopping:
            self._ioloop.stop()
            return
        if self._awaiting_cancels():
            self._ioloop.call_later(CANCELS_LOOK, self._connect)
            return
        self.slot.set_state(CONNECTING)
        self._session = Session(
            self.queue, self.broker, self._failover.current,
            f"workqd {self.name} pid {self.pid}", self._ioloop, self._ack_batch,
            self._handler.idle, self, self._publisher, self._declares_levels(),
            on_consuming=self._guard(self._on_consuming),
            on_message=self._on_message, on_closed=self._guard(self._on_closed))
        if self.queue.limits.any:
            self._gate = Limits(self.queue, self._ioloop, self.slot,
                                lambda: not self._handler.busy(), self._guard(self._follow_pause),
                                self._publish_token)
        self._session.held = self._hold()
        self._session.open()

    def _publish_token(self, queue: str, wanted) -> None:
        """A rate token from this worker's generator, unconfirmed (a lost one only
        lowers the rate for a moment)."""
        self._publisher.publish(queue, b"", _TOKEN_PROPS, False, done=None, wanted=wanted)

    def _awaiting_cancels(self) -> bool:
        """Before consuming: has the host's poller not read the cancel log yet, or not
        tried the delay levels yet?"""
        table = self._cancels
        if table is None or (table.loaded and (table.levels != cancels.LEVELS_UNKNOWN
                                               or not self.queue.declare_side_queues)):
            return False
        if time.monotonic() < self._cancels_deadline:
            return True
        if self._cancels_deadline:
            why = ("the cancel log is not read" if not table.loaded
                   else "the host's poller has not declared the delay levels")
            log.warning("%s after %gs; consuming without waiting for it", why, CANCELS_WAIT)
            self._cancels_deadline = 0.0
        return False

    def _declares_levels(self) -> bool:
        """Must this worker's session declare the vhost's delay levels itself? Only when
        the host's poller has not (no table, not yet, or the broker refused the poller's
        declaration: then the worker's own reports why, and the worker stops)."""
        return self._cancels is None or self._cancels.levels != cancels.LEVELS_DECLARED

    def _on_consuming(self, session: Session) -> None:
        if session is not self._session:
            return
        if self._stopping:
            session.stop_consuming()
            self._finish_if_idle()
            return
        self._failover.succeeded()
        self._publisher.prefer(session.url)
        gate = self._gate
        if gate is not None and not gate.started:
            gate.start(session.connection)
        # Each line is written before the state it names reaches the master, so the
        # log never shows the master's word on it ("ready") ahead of the worker's own.
        if not session.consuming and not self.slot.paused:   # held by the concurrency cap
            log.info("connected to %s; waiting for one of the %d concurrency slots of %s",
                     redact(session.url), self.queue.limits.concurrency, self.queue.name)
            self.slot.set_state(LIMITED)
            self._wake_master()
            return
        if not session.consuming:   # held: the master paused this queue
            log.info("paused: connected to %s, not consuming from %s", redact(session.url),
                     self.queue.name)
            self.slot.set_state(PAUSED)
            self._wake_master()
            return
        log.info("consuming from %s on %s (prefetch %d)", self.queue.name,
                 redact(session.url), self.queue.prefetch)
        self.slot.subscribed()
        self._wake_master()

    def on_consumer_lost(self) -> None:
        """Session event: the broker cancelled our consumer; not consuming until it is back."""
        self.slot.set_state(CONNECTING)
        self._wake_master()

    def _on_closed(self, session: Session, verdict: Verdict) -> None:
        if session is not self._session:
            return
        self._session = None
        self.slot.set_state(CONNECTING)
        if self._gate is not None:
            self._gate.take_waiting()   # the broker requeued those too
            self._gate.close()
            self._gate = None
        # The broker requeued everything unacked on that channel: what the handler
        # thread has not started yet must not run here as well.
        self._handler.take_unstarted()
        if verdict.exit_code is not None:
            log.error("%s", verdict.why)
            if self._exit_code is None or self._exit_code == exitcodes.WORKER_OK:
                self._exit_code = verdict.exit_code
            self._ioloop.stop()
            return
        if self._stopping:
            self._ioloop.stop()
            return
        delay = self._failover.failed()
        log.warning("%s; reconnecting in %.1fs", verdict.why, delay)
        self._wake_master()
        self._ioloop.call_later(delay, self._connect)

    # --- intake ------------------------------------------------------------------

    def _on_message(self, channel, method, props, body: bytes) -> None:
        """pika's consumer callback, once per delivery: the hot path of the I/O thread.
        It guards itself, as ``_guard`` does, without that wrapper's frames."""
        session = self._session
        if session is None or channel is not session.channel:
            return   # a channel of an earlier session: the broker requeued its deliveries
        try:   # zero-cost until something raises (Python 3.11)
            if self._handler.results:
                self._settle_results()   # the quiet ones (HandlerThread.wake_always)
            settler = session.settler
            try:
                task, problem = intake.read_task(self.queue.name, method.redelivered, props,
                                                 body, method.routing_key, method.exchange)
            except Exception as e:
                # Someone else's header that intake cannot read: the message is at fault,
                # not this worker. Stopping would only have it redelivered to the next one.
                task, problem = intake.unreadable_task(self.queue.name, method.redelivered,
                                                       props, body, e)
            d = settler.receive(method.delivery_tag, body, props, task)
            if self._stopping:
                settler.requeue(d)
                return
            if problem:
                self._refuse(d, vocab.REASON_MALFORMED, problem)
                return
            if task.redelivered:
                problem = self._poison_problem(task)
                if problem:
                    self._refuse(d, vocab.REASON_POISON, problem)
                    return
            max_body = self.queue.max_body
            if max_body and len(body) > max_body:
                self._refuse(d, vocab.REASON_TOO_LARGE, intake.size_problem(body, max_body))
                return
            if self._cancelled(d):
                return
            h = task.headers
            if h and (vocab.H_EXPIRES_MS in h or delays.H_DUE_MS in h) and not self._on_time(d):
                return
            self._received += 1
            if self._recycles and self._last_task_taken():
                if self._rated:
                    self._gate.take(d, self._take_last)
                else:
                    self._take_last(d)
            elif self._rated:
                self._gate.take(d, self._handler.submit)
            else:
                self._handler.submit(d)
        except Exception:
            log.exception("internal error in _on_message; stopping this worker")
            self.stop(exitcodes.WORKER_CRASH)

    def _cancelled_at(self, task) -> int:
        """When ``task``'s id was cancelled, 0 when it was not (any thread: the table is
        shared memory this process only reads)."""
        table = self._cancels
        return table.cancelled_at(message_digest(task.message_id)) if table is not None else 0

    def _cancelled(self, d: Delivery) -> bool:
        """True when ``d``'s id was cancelled: it is dead-lettered here, unrun."""
        table = self._cancels   # per delivery: the look-up without a helper's frame
        if table is None:
            return False
        at = table.cancelled_at(message_digest(d.task.message_id))
        if not at:
            return False
        self._refuse(d, vocab.REASON_CANCELLED, f"cancelled by workqctl cancel at {_utc(at)}")
        return True

    def _on_time(self, d: Delivery) -> bool:
        """The task's clock: False when it is settled here unrun, expired (dead-lettered)
        or not due yet (sent through the delay levels for the rest of its wait)."""
        verdict = timing.judge(d.task.headers, int(time.time() * 1000))
        if verdict.kind == timing.ON_TIME:
            return True
        if verdict.kind == timing.EXPIRED:
            self._refuse(d, vocab.REASON_EXPIRED, "delivered after its deadline "
                         f"({vocab.H_EXPIRES_MS} {d.task.headers[vocab.H_EXPIRES_MS]})")
            return False
        if not self.queue.declare_side_queues:
            # No levels to send it through: run it now rather than hold it.
            log.info("task %s arrived %.0fs before it is due; without side queues there are "
                     "no delay levels to wait in: running it now", d.task.message_id,
                     verdict.seconds_left)
            return True
        log.info("task %s arrived %.0fs before it is due: back through the delay levels for "
                 "the rest", d.task.message_id, verdict.seconds_left)
        self._publish(d, postpone(self.queue, d.task.headers, verdict.seconds_left,
                                  verdict.due_ms))
        return False

    def _take_last(self, d: Delivery) -> None:
        """A recycling worker's last task: cancel now, while it runs, and let the master
        start the replacement, so that it consumes by the time this worker leaves. When
        the task runs next, the handler thread raises the draining flag as it begins it
        (HandlerThread.last); behind other tasks, which keep this worker busy meanwhile,
        the flag goes up now."""
        runs_next = self._handler.running is None and self._handler.idle()
        if runs_next:
            self._handler.last = d
        self._handler.submit(d)
        self.stop(exitcodes.WORKER_RECYCLE, requeue_buffered=False, flag=not runs_next)

    def _poison_problem(self, task) -> str | None:
        crashes = self.slot.table.crashes(self.slot.pool_id, task.message_id, self.pid)
        # On quorum queues the broker counts every return, cluster-wide.
        returns = task.delivery_count if self.queue.type == "quorum" else 0
        log.info("task %s redelivered (%d earlier deliveries, %d worker deaths): it may have "
                 "run before", task.message_id, returns, crashes)
        return intake.poison_problem(crashes, returns, self.queue.max_redeliveries)

    def _last_task_taken(self) -> bool:
        q = self.queue
        if q.max_tasks_per_worker and self._received >= q.max_tasks_per_worker:
            log.info("recycling after this task: %d tasks taken (max_tasks_per_worker)",
                     self._received)
            return True
        if q.max_memory_per_worker:
            rss = _rss_bytes()
            if rss > q.max_memory_per_worker:
                log.info("recycling after this task: RSS %d MiB is past max_memory_per_worker "
                         "(%d MiB)", rss >> 20, q.max_memory_per_worker >> 20)
                return True
        return False

    # --- settlement ----------------------------------------------------------------

    def _on_results(self, fd, events) -> None:
        """The handler thread's eventfd: settle every result it has appended. Guards
        itself, as ``_guard`` does (once per wake-up, often once per task)."""
        try:
            results = self._handler.results_due()
            while results:
                self._on_result(results.popleft())
        except Exception:
            log.exception("internal error in _on_results; stopping this worker")
            self.stop(exitcodes.WORKER_CRASH)

    def _settle_results(self) -> None:
        """Settle the results the handler thread appended without a wake-up: successes
        it acked itself (their ack is out; what is left is bookkeeping)."""
        results = self._handler.results
        while results:
            self._on_result(results.popleft())

    def _on_result(self, d: Delivery) -> None:
        """The handler thread has run ``d`` (its run fields are written)."""
        if d.abandoned:
            return  # settled as timed out already; the thread's late result means nothing
        d.duration, d.error = d.ran_for, d.failure
        if d is self._stopping_cancelled:
            self._stopping_cancelled = None
        if d.outcome != vocab.SUCCESS and self._cancelled_at(d.task):
            # Stopped, skipped or failed: a cancelled task is not tried again. One that
            # finished before its cancel arrived stays a success.
            self._settle(d, vocab.DEAD_LETTER, vocab.REASON_CANCELLED)
            return
        self._settle(d, d.outcome)

    def _refuse(self, d: Delivery, reason: str, problem: str) -> None:
        """Dead-letter a task unrun."""
        d.error = problem
        if reason == vocab.REASON_MALFORMED:
            # Only headers pika can encode go on the copy: what it decoded is not always.
            d.task.headers = frames.safe_headers(d.task.headers)
        self._settle(d, vocab.DEAD_LETTER, reason)

    def _settle(self, d: Delivery, outcome: int, reason: str | None = None) -> None:
        if outcome == vocab.SUCCESS and reason is None:
            # Nearly every task: the hot path of the I/O thread, without the policy call.
            if d.acked:
                # The handler thread acked and counted it (settle.py, ack_from_handler).
                d.settler.acked_by_handler(d)
            else:
                if not d.counted:   # the handler thread counted it, then could not send
                    self.slot.record(vocab.SUCCESS, d.duration)
                if d.settler.ack(d):
                    if d.props.reply_to:
                        d.settler.reply(d, "success", True)
                else:
                    self.on_unsettled(d, "channel gone")
            if self._stopping:
                self._finish_if_idle()
            return
        q = self.queue
        s = decide(q, d.task.attempt, d.task.headers, outcome, d.error, reason,
                   defer_for=d.defer_for)
        settler = d.settler
        if s.reject:   # declare_side_queues: false (policy.decide)
            log.warning("task %s rejected to the broker (no side queues): %s",
                        d.task.message_id, d.error)
            if settler.reject(d):
                self.slot.record(s.metric, d.duration)
                settler.reply(d, vocab.OUTCOMES[s.metric], True)
            else:
                self.on_unsettled(d, "channel gone")
        else:
            if s.final:
                log.warning("task %s dead-lettered to %s (%s): %s", d.task.message_id,
                            s.target, s.headers[vocab.H_REASON], d.error)
            elif s.metric == vocab.DEFERRED:
                log.info("task %s deferred by its handler (%d of %d): %s; back in %gs",
                         d.task.message_id, s.headers[vocab.H_DEFERRALS],
                         q.retry.max_deferrals, d.error, s.delay)
            else:
                log.info("task %s: %s; try %d of %d in %gs", d.task.message_id, d.error,
                         d.task.attempt + 1, q.retry.attempts, s.delay)
            self._publish(d, s)
        self._finish_if_idle()

    def _publish(self, d: Delivery, s) -> None:
        """Send a settlement's copy; the original is acked once the broker confirms it."""
        settler = d.settler
        try:
            published = settler.publish_copy(d, s)
        except (TypeError, ValueError, struct.error, pika.exceptions.ProtocolSyntaxError,
                pika.exceptions.ShortStringTooLong) as e:
            # pika could not encode a header it decoded: keep only workqd's own.
            log.warning("task %s: cannot copy its headers (%s); the copy keeps workqd's "
                        "headers only", d.task.message_id, e)
            published = settler.publish_copy(d, dataclasses.replace(s, headers={
                k: v for k, v in s.headers.items() if k.startswith("x-workq-")}))
        if not published:
            self.on_unsettled(d, "channel gone")

    def on_settled(self, d: Delivery, metric: int | None) -> None:
        """Settler event: the broker has the copy of ``d`` and the original is acked.
        ``metric`` None: a task postponed unrun, which is not an outcome."""
        if metric is not None:
            self.slot.record(metric, d.duration)
        self._finish_if_idle()

    def on_unsettled(self, d: Delivery, why: str) -> None:
        """Settler event: ``d`` could not be settled here; the broker redelivers it."""
        if why == "channel gone":
            log.warning("task %s finished but its channel is gone: cannot ack, the broker "
                        "redelivers it (a duplicate run)", d.task.message_id)
        self._finish_if_idle()

    # --- periodic checks --------------------------------------------------------

    def _tick(self) -> None:
        try:
            self._check()
        except Exception:
            log.exception("internal error in the periodic check; stopping this worker")
            self.stop(exitcodes.WORKER_CRASH)
        self._ioloop.call_later(TICK, self._tick)

    def _check(self) -> None:
        self.slot.tick()
        if self._handler.results:
            self._settle_results()   # the last quiet success of a burst

        now = time.monotonic()
        if self._session is not None and now >= self._next_consumer_check:
            self._next_consumer_check = now + CONSUMER_CHECK_EVERY
            self._session.check(now)
        if os.getppid() != self._master_pid and not self._stopping:
            # An orphan would go on consuming with nobody to supervise or count it.
            log.error("the master (pid %d) is gone; stopping", self._master_pid)
            self.stop(exitcodes.WORKER_OK)
        self._follow_pause()
        if self._stopping:
            # Each event that frees a stopping worker calls _finish_if_idle itself; this
            # is the net under them, so one that reports nothing costs a tick, not the
            # SIGKILL at shutdown_timeout.
            self._finish_if_idle()
        d = self._handler.running
        if (d is not None and not d.abandoned and self.queue.handler.python
                and time.monotonic() - d.started > self.queue.timeout):
            # A thread cannot be killed: settle the task as timed out, then
            # leave so the master replaces this process.
            if not d.settler.abandon(d):
                return   # it returned and acked itself meanwhile
            log.error("task %s ran past its timeout of %gs; settling it as timed out and "
                      "recycling this worker", d.task.message_id, self.queue.timeout)
            d.duration = time.monotonic() - d.started
            d.error = f"ran past {self.queue.timeout:g}s"
            self._settle(d, vocab.TIMEOUT)
            self.stop(exitcodes.WORKER_TIMEOUT)
        self._stop_if_cancelled()

    def _stop_if_cancelled(self) -> None:
        """The running task was cancelled: stop it as a timeout would, and dead-letter it
        as cancelled. A command's process group gets TERM, KILL after timeout_grace; a
        Python handler's thread cannot be stopped, so this worker settles the task and
        leaves, and the master starts a replacement."""
        d = self._handler.running
        if (d is None or d.abandoned or d is self._stopping_cancelled
                or self._cancels is None):
            return
        at = self._cancelled_at(d.task)
        if not at:
            return
        if self.queue.handler.command:
            log.warning("task %s cancelled (at %s) while running: stopping its command "
                        "(SIGTERM to its process group, SIGKILL after %gs)",
                        d.task.message_id, _utc(at), self.queue.timeout_grace)
            self._stopping_cancelled = d
            self._run.cancel(d.task)
            return
        if not d.settler.abandon(d):
            return   # it returned and acked itself meanwhile: a success stays one
        log.warning("task %s cancelled (at %s) while running: settling it as cancelled and "
                    "replacing this worker (a Python handler cannot be stopped in place)",
                    d.task.message_id, _utc(at))
        d.duration = time.monotonic() - d.started
        d.error = f"cancelled by workqctl cancel at {_utc(at)} while running"
        self._settle(d, vocab.DEAD_LETTER, vocab.REASON_CANCELLED)
        self.stop(exitcodes.WORKER_CANCELLED)

    def _hold(self) -> bool:
        """Hold no consumer: the master paused the queue, or no concurrency slot is ours."""
        return self.slot.paused or (self._gate is not None and not self._gate.may_consume)

    def _follow_pause(self) -> None:
        """The master's paused word and the concurrency slot: cancel the consumer (running
        tasks finish and are acked on this channel) or consume again."""
        s = self._session
        if s is None or self._stopping:
            return
        hold = self._hold()
        if hold == s.held:
            # Paused while waiting for a slot, or resumed still waiting: say which.
            want = PAUSED if self.slot.paused else LIMITED
            if hold and self.slot.state in (PAUSED, LIMITED) and self.slot.state != want:
                self.slot.set_state(want)
                self._wake_master()
            return
        if hold:
            s.held = True
            was_consuming = s.consuming
            s.stop_consuming()
            if was_consuming:
                self.slot.set_state(PAUSED if self.slot.paused else LIMITED)
                self._wake_master()
                log.info("paused: consumer of %s cancelled; a running task finishes",
                         self.queue.name)
        else:
            s.consume_again()   # _on_consuming logs it


_TOKEN_PROPS = pika.BasicProperties()


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _no_op(signum, frame) -> None:
    """The signal number is already in the wakeup pipe."""


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE
