"""A worker process: one AMQP connection, one channel, one handler thread.

The connection's I/O loop runs in the main thread and never runs task code, so
heartbeats keep flowing while a handler works for hours. Deliveries go to the
handler thread through a queue; results come back with
``add_callback_threadsafe`` and are settled (acked, retried, dead-lettered) on
the I/O thread, on the channel the delivery came from, and only if that channel
is still the open one: after a reconnect the broker has already requeued every
unacked delivery, and an ack for a stale tag would be a protocol error.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import logging
import os
import queue as queue_mod
import signal
import threading
import time

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from . import exitcodes, logsetup, runner
from .broker import (H_ATTEMPT, H_DEAD_AT, H_ERROR, H_QUEUE, H_REASON, connection_parameters,
                     dead_letter_arguments, delay_queue_arguments, delay_queue_name, queue_arguments,
                     redact)
from .config import Broker, Queue
from .slots import BUSY, CONNECTING, DEAD_LETTER, OUTCOMES, RETRY, SUCCESS, TIMEOUT, Slot

log = logging.getLogger("workqd.worker")

TICK = 0.25                # seconds between liveness ticks and Python-handler timeout checks
ACK_FLUSH_DELAY = 0.005    # coalesced acks wait at most this long
RECONNECT_MAX = 15.0       # cap of the reconnect backoff, seconds
AUTH_ERRORS = (pika.exceptions.ProbableAuthenticationError,
               pika.exceptions.ProbableAccessDeniedError)


class _Delivery:
    """One message between arrival and settlement."""

    __slots__ = ("channel", "tag", "body", "props", "task", "started", "duration", "outcome",
                 "error", "abandoned", "final")

    def __init__(self, channel, tag, body, props, task):
        self.channel = channel
        self.tag = tag
        self.body = body
        self.props = props
        self.task = task
        self.started = 0.0
        self.duration = 0.0
        self.outcome = SUCCESS
        self.error = ""
        self.abandoned = False  # settled without the handler (timeout): ignore its late result
        self.final = True       # no further try follows this outcome


def message_id_of(props, body: bytes) -> str:
    """The message id, or a digest of the body for messages published without one."""
    if props.message_id:
        return str(props.message_id)
    return "sha1:" + hashlib.sha1(body).hexdigest()[:20]


class Worker:
    """Built in the master before fork; ``run()`` is the child's whole life."""

    def __init__(self, number: int, queue: Queue, broker: Broker, slot: Slot, wake_fd: int,
                 log_level: str):
        self.number = number
        self.queue = queue
        self.broker = broker
        self.slot = slot
        self.wake_fd = wake_fd
        self.log_level = log_level
        self.name = f"{queue.name}#{number}"
        self.pid = 0
        self._urls = list(broker.urls)
        self._ioloop: IOLoop | None = None
        self._connection = None
        self._channel = None
        self._consumer_tag = None
        self._tasks: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self._inflight: dict[int, _Delivery] = {}
        self._current: _Delivery | None = None
        self._ack_tags: list[int] = []  # successfully-run tags waiting for a coalesced ack
        self._ack_timer = None
        self._ack_soon = False
        self._queue_name = queue.name
        self._recycles = bool(queue.max_tasks_per_worker or queue.max_memory_per_worker)
        self._publish_seq = 0      # publisher-confirm sequence on the current channel
        self._confirms: dict[int, tuple[_Delivery, int]] = {}
        self._ack_batch = 1 if queue.prefetch == 1 else max(1, (queue.prefetch or 200) // 2)
        self._stopping = False
        self._exit_code: int | None = None
        self._failures = 0         # consecutive failed connection attempts
        self._declaring = False
        self._received = 0          # deliveries handed to the handler thread

    # --- life cycle ------------------------------------------------------

    def run(self) -> int:
        """Runs in the forked child; returns the exit status."""
        self.pid = os.getpid()
        self._master_pid = os.getppid()
        logsetup.configure(self.log_level, f"worker {self.name} (pid {self.pid})")
        self.slot.set_pid(self.pid)
        self.slot.tick()
        try:
            self._handler = runner.load(self.queue.handler, self.queue.timeout)
        except runner.BootError as e:
            log.error("%s", e)
            return exitcodes.WORKER_BOOT_ERROR
        self._ioloop = IOLoop()
        # Finished deliveries come back through a deque; the handler thread writes
        # the eventfd only when the I/O thread is not already due to look.
        self._done = collections.deque()
        self._done_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_armed = False
        self._ioloop.add_handler(self._done_fd, self._on_done_fd, IOLoop.READ)
        self._install_signals()
        threading.Thread(target=self._handler_loop, name="handler", daemon=True).start()
        self._ioloop.add_callback_threadsafe(self._connect)
        self._ioloop.call_later(TICK, self._tick)
        self._ioloop.start()
        return self._exit_code if self._exit_code is not None else exitcodes.WORKER_OK

    def _install_signals(self) -> None:
        # The handlers do nothing: the C-level handler writes the signal number to
        # the wakeup pipe, and the I/O loop reads it there, outside any handler.
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: None)
        # Ctrl-C reaches the whole process group; the master decides what it means.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self._ioloop.add_handler(r, self._on_signal_pipe, IOLoop.READ)

    def _on_signal_pipe(self, fd, events) -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGTERM:
                if not self._stopping:
                    log.info("stopping: finishing the running task, taking no new ones")
                self.stop(exitcodes.WORKER_OK)

    def stop(self, exit_code: int, requeue_buffered: bool = True) -> None:
        """Stop taking tasks, settle what runs, then close and leave with ``exit_code``.

        The draining flag makes the master start a replacement at once (unless
        it is stopping everything), so capacity does not wait for this exit.
        """
        if self._exit_code is None:
            self._exit_code = exit_code
        if self._stopping:
            self._maybe_finish_stop()
            return
        self._stopping = True
        self.slot.set_draining()
        self._wake_master()
        if self._channel is not None and self._channel.is_open and self._consumer_tag:
            self._channel.basic_cancel(self._consumer_tag)
        if requeue_buffered:
            self._requeue_unstarted()
        self._maybe_finish_stop()

    def _requeue_unstarted(self) -> None:
        """Give back deliveries that are buffered here but were never started."""
        while True:
            try:
                d = self._tasks.get_nowait()
            except queue_mod.Empty:
                return
            if d is None:
                continue
            self._inflight.pop(d.tag, None)
            if d.channel is self._channel and d.channel.is_open:
                d.channel.basic_nack(d.tag, requeue=True)

    def _maybe_finish_stop(self) -> None:
        if self._inflight or self._confirms:
            return
        self._flush_acks()
        conn = self._connection
        if conn is not None and conn.is_open:
            conn.close()  # _on_connection_closed stops the loop
        elif conn is None or conn.is_closed:
            self._ioloop.stop()

    def _wake_master(self) -> None:
        try:
            os.write(self.wake_fd, b"w")
        except OSError:
            pass  # the pipe is full (the master will look anyway) or the master is gone

    # --- connection ------------------------------------------------------

    def _connect(self) -> None:
        if self._stopping:
            self._ioloop.stop()
            return
        url = self._urls[0]
        self.slot.set_state(CONNECTING)
        try:
            params = connection_parameters(
                self.broker, url, f"workqd {self.name} pid {self.pid}")
        except (ValueError, OSError) as e:
            log.error("cannot use broker URL %s: %s", redact(url), e)
            self._exit_code = exitcodes.WORKER_BROKER_REFUSED
            self._ioloop.stop()
            return
        self._connection = pika.SelectConnection(
            params, on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_failed,
            on_close_callback=self._on_connection_closed, custom_ioloop=self._ioloop)

    def _on_connection_failed(self, connection, error) -> None:
        self._connection = None
        if isinstance(error, AUTH_ERRORS):
            log.error("broker %s refused the login: %s", redact(self._urls[0]), error)
            self._exit_code = exitcodes.WORKER_BROKER_REFUSED
            self._ioloop.stop()
            return
        self._schedule_reconnect(f"cannot connect to {redact(self._urls[0])}: {error!r}")

    def _schedule_reconnect(self, why: str) -> None:
        if self._stopping:
            self._ioloop.stop()
            return
        self._failures += 1
        # Try the next node first; the failed one goes last (a hung node would
        # otherwise eat a whole stack_timeout on every attempt).
        if len(self._urls) > 1:
            self._urls.append(self._urls.pop(0))
        delay = 0 if len(self._urls) > 1 and self._failures <= len(self._urls) else \
            min(RECONNECT_MAX, 0.25 * 2 ** min(self._failures - 1, 8))
        log.warning("%s; reconnecting in %.1fs", why, delay)
        self._wake_master()
        self._ioloop.call_later(delay, self._connect)

    def _on_connection_open(self, connection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_closed(self, connection, reason) -> None:
        self._connection = None
        self._channel = None
        self._consumer_tag = None
        self._forget_channel_state()
        if self._stopping:
            self._ioloop.stop()
            return
        if self._exit_code is not None:
            self._ioloop.stop()
            return
        self._schedule_reconnect(f"connection lost: {reason!r}")

    def _forget_channel_state(self) -> None:
        # The broker requeues everything unacked on a closed channel; whatever the
        # handler thread still runs will find its channel closed and not ack.
        if self._ack_timer is not None:
            self._ioloop.remove_timeout(self._ack_timer)
            self._ack_timer = None
        self._ack_soon = False
        self._ack_tags = []
        self._confirms.clear()
        self._publish_seq = 0
        for d in list(self._inflight.values()):
            if d is not self._current:
                self._inflight.pop(d.tag, None)
        self._requeue_unstarted()
        if self._current is not None:
            self._inflight = {self._current.tag: self._current}
        if self._stopping:
            self._maybe_finish_stop()

    # --- channel setup: declare, qos, consume -----------------------------

    def _on_channel_open(self, channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_returned)
        self._declaring = True
        q = self.queue
        channel.queue_declare(q.name, durable=True, arguments=queue_arguments(q),
                              callback=lambda _: self._declare_side_queues(channel))

    def _declare_side_queues(self, channel) -> None:
        q = self.queue
        pending = [(q.dead_letter_queue, dead_letter_arguments(q))]
        for delay in sorted({q.retry.delay_before(a) for a in range(2, q.retry.attempts + 1)}):
            if delay > 0:
                pending.append((delay_queue_name(q, delay), delay_queue_arguments(q, delay)))

        def next_one(_frame=None):
            if not pending:
                self._declaring = False
                channel.confirm_delivery(self._on_confirm,
                                         callback=lambda _: channel.basic_qos(
                                             prefetch_count=q.prefetch,
                                             callback=lambda _: self._start_consuming(channel)))
                return
            name, args = pending.pop(0)
            channel.queue_declare(name, durable=True, arguments=args, callback=next_one)
        next_one()

    def _start_consuming(self, channel) -> None:
        if self._stopping:
            self._maybe_finish_stop()
            return
        self._consumer_tag = channel.basic_consume(self.queue.name, self._on_message,
                                                   auto_ack=False)
        self._failures = 0
        self.slot.subscribed()
        if self._current is not None:
            self.slot.set_state(BUSY)
        self._wake_master()
        log.info("consuming from %s on %s (prefetch %d)", self.queue.name,
                 redact(self._urls[0]), self.queue.prefetch)

    def _on_channel_closed(self, channel, reason) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        self._consumer_tag = None
        code = getattr(reason, "reply_code", 0)
        text = getattr(reason, "reply_text", str(reason))
        if self._declaring and code == 406:
            log.error("queue %s (or its dead-letter/delay queue) exists on the broker with "
                      "other arguments than this config declares (%s): %s", self.queue.name,
                      queue_arguments(self.queue), text)
            self._exit_code = exitcodes.WORKER_QUEUE_MISMATCH
        elif code == 406 and "timeout" in text.lower():
            log.error("the broker closed the channel because a delivery stayed unacked past "
                      "its consumer_timeout (%s); message %s will be redelivered", text,
                      self._current.task.message_id if self._current else "-")
        elif code == 403 or code == 404:
            log.error("broker refused channel operation: %s %s", code, text)
            self._exit_code = exitcodes.WORKER_BROKER_REFUSED
        elif not self._stopping:
            log.warning("channel closed by the broker: %s %s", code, text)
        self._forget_channel_state()
        conn = self._connection
        if conn is not None and conn.is_open:
            conn.close()  # reconnect with a fresh connection (or exit, per _exit_code)

    # --- deliveries ------------------------------------------------------

    def _on_message(self, channel, method, props, body) -> None:
        headers = props.headers
        mid = message_id_of(props, body)
        if headers:
            task = runner.Task(mid, self._queue_name, headers, method.redelivered,
                               int(headers.get("x-delivery-count", 0) or 0),
                               int(headers.get(H_ATTEMPT, 1) or 1))
        else:
            task = runner.Task(mid, self._queue_name, {}, method.redelivered, 0, 1)
        d = _Delivery(channel, method.delivery_tag, body, props, task)
        if self._stopping:
            channel.basic_nack(d.tag, requeue=True)
            return
        self._inflight[d.tag] = d
        if method.redelivered and self._is_poison(d):
            return
        if len(body) > self.queue.max_body:
            d.outcome, d.error = DEAD_LETTER, f"body of {len(body)} bytes exceeds max_body"
            self._settle(d, reason="too-large")
            return
        self._tasks.put(d)
        self._received += 1
        if self._recycles and self._last_task_taken():
            # Cancel now, while this last task runs, so the master's replacement
            # is consuming by the time this worker leaves.
            self.stop(exitcodes.WORKER_RECYCLE, requeue_buffered=False)

    def _is_poison(self, d: _Delivery) -> bool:
        """Dead-letter, unrun, a task that already killed max_redeliveries workers."""
        task, q = d.task, self.queue
        crashes = self.slot.table.crashes(self.slot.pool_id, task.message_id, self.pid)
        # On quorum queues the broker counts every return, cluster-wide.
        returns = task.delivery_count if q.type == "quorum" else 0
        log.info("task %s redelivered (%d earlier deliveries, %d worker deaths): it may have "
                 "run before", task.message_id, returns, crashes)
        if max(crashes, returns) < q.max_redeliveries:
            return False
        d.outcome = DEAD_LETTER
        d.error = (f"poison: killed its worker {crashes} time(s)" if crashes >= returns else
                   f"poison: delivered {returns + 1} times without being acked")
        self._settle(d, reason="poison")
        return True

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

    def _handler_loop(self) -> None:
        """The handler thread: run tasks one by one, hand results back to the I/O loop."""
        slot = self.slot
        run = self._handler
        tasks = self._tasks
        done = self._done
        done_fd = self._done_fd
        debug = log.isEnabledFor(logging.DEBUG)
        while True:
            d = tasks.get()
            if d is None:
                return
            self._current = d
            slot.begin(d.task.message_id, d.task.redelivered)
            d.started = time.monotonic()
            if debug:
                log.debug("task %s started", d.task.message_id)
            try:
                run(d.body, d.task)
            except runner.HandlerTimedOut as e:
                d.outcome, d.error = TIMEOUT, str(e)
            except Exception as e:
                d.outcome, d.error = RETRY, _error_line(e)
                log.warning("task %s failed: %s", d.task.message_id, d.error,
                            exc_info=not isinstance(e, runner.HandlerFailed))
            self._current = None
            slot.end()
            done.append(d)
            if not self._wake_armed:
                self._wake_armed = True
                os.eventfd_write(done_fd, 1)

    def _on_done_fd(self, fd, events) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        self._wake_armed = False  # before draining: a later append wakes us again
        done = self._done
        while done:
            self._on_task_done(done.popleft())

    def _on_task_done(self, d: _Delivery) -> None:
        if d.abandoned:
            return
        # A worker past max_memory_per_worker recycles when it takes its next task
        # (see _last_task_taken), not now: leaving while idle would open a gap
        # until the replacement consumes.
        self._settle(d)

    def _settle(self, d: _Delivery, reason: str | None = None) -> None:
        """Turn the outcome into what the broker must see: ack, or republish then ack."""
        duration = d.duration = time.monotonic() - d.started if d.started else 0.0
        outcome = d.outcome
        if outcome == SUCCESS:
            self.slot.record(SUCCESS, duration)
            if self._ack(d):
                self._reply(d, "success")
            if self._stopping:
                self._maybe_finish_stop()  # after the reply: closing would drop it
            return
        q = self.queue
        if outcome == TIMEOUT:
            reason = "timeout"
        # The copy is a new message to the broker: its delivery count starts afresh.
        headers = {k: v for k, v in d.task.headers.items() if k != "x-delivery-count"}
        attempts_left = d.task.attempt < q.retry.attempts and reason in (None, "timeout")
        if attempts_left:
            delay = q.retry.delay_before(d.task.attempt + 1)
            target = delay_queue_name(q, delay) if delay > 0 else q.name
            headers[H_ATTEMPT] = d.task.attempt + 1
            headers[H_ERROR] = d.error[:500]
            metric = TIMEOUT if outcome == TIMEOUT else RETRY
            log.info("task %s: %s; try %d of %d in %gs", d.task.message_id, d.error,
                     d.task.attempt + 1, q.retry.attempts, delay)
            self._republish(d, target, headers, metric, "retry")
        else:
            headers.update({H_REASON: reason or "failed", H_ERROR: d.error[:500],
                            H_ATTEMPT: d.task.attempt, H_QUEUE: q.name,
                            H_DEAD_AT: datetime.datetime.now(datetime.timezone.utc)
                            .isoformat(timespec="seconds")})
            metric = TIMEOUT if outcome == TIMEOUT else DEAD_LETTER
            log.warning("task %s dead-lettered to %s (%s): %s", d.task.message_id,
                        q.dead_letter_queue, reason or "failed", d.error)
            self._republish(d, q.dead_letter_queue, headers, metric, "dead_letter")

    def _republish(self, d: _Delivery, routing_key: str, headers: dict, metric: int,
                   outcome_name: str) -> None:
        ch = d.channel
        if ch is not self._channel or not ch.is_open:
            self._lost_ack(d)
            return
        # Acks of earlier successes first: a coalesced multiple-ack must never
        # cover this delivery while its copy is still unconfirmed.
        self._flush_acks()
        p = d.props
        props = pika.BasicProperties(
            content_type=p.content_type, content_encoding=p.content_encoding, headers=headers,
            delivery_mode=2, priority=p.priority, correlation_id=p.correlation_id,
            reply_to=p.reply_to, message_id=d.task.message_id, timestamp=p.timestamp,
            type=p.type, app_id=p.app_id)
        ch.basic_publish("", routing_key, d.body, props, mandatory=True)
        self._publish_seq += 1
        self._confirms[self._publish_seq] = (d, metric)
        d.error = d.error or outcome_name
        d.outcome = metric
        d.final = outcome_name == "dead_letter"

    def _on_confirm(self, frame) -> None:
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        tags = ([t for t in self._confirms if t <= method.delivery_tag] if method.multiple
                else [method.delivery_tag])
        for seq in sorted(tags):
            entry = self._confirms.pop(seq, None)
            if entry is None:
                continue
            d, metric = entry
            ch = d.channel
            if not ok:
                log.error("broker refused the copy of task %s; requeueing the original",
                          d.task.message_id)
                self._inflight.pop(d.tag, None)
                if ch is self._channel and ch.is_open:
                    ch.basic_nack(d.tag, requeue=True)
                continue
            self.slot.record(metric, d.duration)
            self._inflight.pop(d.tag, None)
            if ch is self._channel and ch.is_open:
                ch.basic_ack(d.tag)
                self._reply(d, OUTCOMES[metric])
        if self._stopping:
            self._maybe_finish_stop()

    def _on_returned(self, channel, method, props, body) -> None:
        # A republished copy found no queue (someone deleted it). The confirm that
        # follows is an ack, so mark the delivery to be nacked back instead.
        log.error("copy of task %s was unroutable (%s %s); it stays on %s",
                  props.message_id, method.reply_code, method.reply_text, self.queue.name)
        for seq, (d, metric) in list(self._confirms.items()):
            if d.task.message_id == props.message_id:
                del self._confirms[seq]
                self._inflight.pop(d.tag, None)
                if d.channel is self._channel and d.channel.is_open:
                    d.channel.basic_nack(d.tag, requeue=True)

    def _ack(self, d: _Delivery) -> bool:
        ch = d.channel
        self._inflight.pop(d.tag, None)
        if ch is not self._channel or not ch.is_open:
            self._lost_ack(d)
            return False
        if self._ack_batch == 1 and not self._confirms:
            ch.basic_ack(d.tag)
        else:
            self._ack_tags.append(d.tag)
            if len(self._ack_tags) >= self._ack_batch:
                self._flush_acks()
            elif self._tasks.empty():
                # Handler idle: flush at the end of this loop iteration, so every
                # completion handled in it shares one multiple-ack frame.
                if not self._ack_soon:
                    if self._ack_timer is not None:
                        self._ioloop.remove_timeout(self._ack_timer)
                    self._ack_timer = self._ioloop.call_later(0, self._flush_acks)
                    self._ack_soon = True
            elif self._ack_timer is None:
                self._ack_timer = self._ioloop.call_later(ACK_FLUSH_DELAY, self._flush_acks)
        return True

    def _flush_acks(self) -> None:
        self._ack_soon = False
        if self._ack_timer is not None:
            self._ioloop.remove_timeout(self._ack_timer)
            self._ack_timer = None
        tags, self._ack_tags = self._ack_tags, []
        ch = self._channel
        if not tags or ch is None or not ch.is_open:
            return
        if len(tags) > 1 and not self._confirms and not self._started_after(tags[-1]):
            # One ack covers every earlier tag: the handler thread runs tasks in
            # delivery order, so all of them completed, and none awaits a confirm.
            ch.basic_ack(tags[-1], multiple=True)
        else:
            for tag in tags:
                ch.basic_ack(tag)

    def _started_after(self, tag: int) -> bool:
        """Whether an earlier delivery than ``tag`` is still unsettled (settled out of order)."""
        return any(t < tag for t in self._inflight)

    def _lost_ack(self, d: _Delivery) -> None:
        self._inflight.pop(d.tag, None)
        log.warning("task %s finished but its channel is gone: cannot ack, the broker "
                    "redelivers it (a duplicate run)", d.task.message_id)
        if self._stopping:
            self._maybe_finish_stop()

    def _reply(self, d: _Delivery, outcome: str) -> None:
        """Tell a waiting ``workq-submit --wait`` what became of its task."""
        reply_to = d.props.reply_to
        ch = self._channel
        if not reply_to or ch is None or not ch.is_open:
            return
        body = json.dumps({"message_id": d.task.message_id, "outcome": outcome,
                           "final": d.final, "seconds": round(d.duration, 3),
                           "error": None if outcome == "success" else d.error})
        ch.basic_publish("", reply_to, body.encode(),
                         pika.BasicProperties(correlation_id=d.task.message_id,
                                              content_type="application/json"))
        self._publish_seq += 1  # confirms count every publish on the channel

    # --- periodic checks -------------------------------------------------

    def _tick(self) -> None:
        self.slot.tick()
        if os.getppid() != self._master_pid and not self._stopping:
            # An orphan would go on consuming with nobody to supervise or count it.
            log.error("the master (pid %d) is gone; stopping", self._master_pid)
            self.stop(exitcodes.WORKER_OK)
        d = self._current
        if (d is not None and not d.abandoned and self.queue.handler.python
                and time.monotonic() - d.started > self.queue.timeout):
            # A thread cannot be killed: settle the task as timed out, then
            # leave so the master replaces this process.
            log.error("task %s ran past its timeout of %gs; settling it as timed out and "
                      "recycling this worker", d.task.message_id, self.queue.timeout)
            d.abandoned = True
            d.outcome, d.error = TIMEOUT, f"ran past {self.queue.timeout:g}s"
            self._current = None
            self._settle(d)
            self.stop(exitcodes.WORKER_TIMEOUT)
        self._ioloop.call_later(TICK, self._tick)


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".rstrip(": ")[:500]


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE
