"""One broker session: a connection and its channel, from connect to close.

A ``Session`` is built for every connection attempt and thrown away when the
connection closes, so nothing about a dead connection (consumer tag, declare
progress, the channel's settler) can leak into the next one. It reports to the
worker through three callbacks and a ``Verdict`` saying whether reconnecting
can help. Everything here runs on the worker's I/O thread.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, NamedTuple

import pika
import pika.exceptions

from .. import delays, eagerio, exitcodes
from ..amqperrors import tls_error
from ..broker import Declaration, connection_parameters, declarations, queue_arguments, redact
from ..config import Binding, Broker, Queue
from .settle import Settler

log = logging.getLogger("workqd.worker")

AUTH_ERRORS = (pika.exceptions.ProbableAuthenticationError,
               pika.exceptions.ProbableAccessDeniedError)


class Verdict(NamedTuple):
    why: str                  # one line for the log
    exit_code: int | None     # None: reconnect; else the worker leaves with this status


def classify_open_error(error, url: str) -> Verdict:
    """A connection that never opened."""
    if isinstance(error, AUTH_ERRORS):
        return Verdict(f"broker {redact(url)} refused the login: {error}",
                       exitcodes.WORKER_BROKER_REFUSED)
    tls = tls_error(error)
    if tls is not None:
        # A certificate that fails verification, or a TLS setup the broker refuses, is
        # configuration: reconnecting would repeat it forever.
        return Verdict(f"TLS with {redact(url)} failed: {tls}", exitcodes.WORKER_BAD_SETTINGS)
    return Verdict(f"cannot connect to {redact(url)}: {error!r}", None)


def classify_channel_close(code: int, text: str, declaring: bool, queue: Queue,
                           item=None) -> Verdict:
    """The broker closed our channel; ``declaring`` while queues were being declared,
    ``item`` the Declaration or Binding the broker refused, when known."""
    if declaring and isinstance(item, Binding) and code == 404:
        return Verdict(f"queue {queue.name}: bindings name exchange {item.exchange!r}, which does "
                       f"not exist on the broker (workqd does not create exchanges): {text}",
                       exitcodes.WORKER_QUEUE_MISSING)
    if declaring and isinstance(item, Declaration) and item.passive and code == 404:
        return Verdict(f"queue {item.name} does not exist on the broker, and with declare: false "
                       f"workqd does not create it: create it, or set declare: true ({text})",
                       exitcodes.WORKER_QUEUE_MISSING)
    if code == 406 and declaring and isinstance(item, (delays.Level, delays.Exchange)):
        return Verdict(f"delay level {item.name} exists on the broker in another shape than "
                       f"workqd declares (delete it once empty, and workqd declares it): {text}",
                       exitcodes.WORKER_QUEUE_MISMATCH)
    if code == 406 and declaring:
        # The broker's text names the argument that differs ("inequivalent arg
        # 'x-max-length' for queue 'q' ...: received '10' but current is '5'").
        if isinstance(item, Declaration):
            return Verdict(f"queue {item.name} exists on the broker with other arguments than "
                           f"this config declares ({item.arguments}): {text}",
                           exitcodes.WORKER_QUEUE_MISMATCH)
        return Verdict(f"queue {queue.name} (or its dead-letter/delay queue) exists on the broker "
                       f"with other arguments than this config declares "
                       f"({queue_arguments(queue)}): {text}", exitcodes.WORKER_QUEUE_MISMATCH)
    if code == 406 and "timeout" in text.lower():
        # The broker has requeued the task: its run here is now a duplicate. Leave,
        # so it ends, and so the master counts it toward the task's poison limit.
        return Verdict(f"the broker closed the channel because a delivery stayed unacked past "
                       f"its consumer_timeout ({text}); the task will be redelivered, and this "
                       f"worker is replaced", exitcodes.WORKER_CONSUMER_TIMEOUT)
    if code == 403:
        return Verdict(f"broker refused access: {code} {text}", exitcodes.WORKER_BROKER_REFUSED)
    if code == 404:
        # A queue whose node is down, or deleted under us: it may come back.
        return Verdict(f"queue not available on the broker: {code} {text}", None)
    return Verdict(f"channel closed by the broker: {code} {text}", None)


# The broker does not always say when it drops a consumer (a deleted quorum queue
# on RabbitMQ 3.10 sends no basic.cancel): a consuming session asks it, this
# often, about the queue, and consumes again on a new connection after
# CONSUMER_CHECK_MISSES answers in a row that show something wrong (consumer_check).
CONSUMER_CHECK_EVERY = 10.0
CONSUMER_CHECK_MISSES = 2
# A broker can keep a connection alive with heartbeats yet never answer a call: a
# session whose declarations, or whose consumer check, have gone unanswered this long
# (as the poller's STUCK_AFTER) cuts its connection, and the worker starts afresh on
# a new one. pika holds a channel's next call behind an unanswered one, so no further
# check is sent meanwhile.
CONSUMER_CHECK_UNANSWERED = 60.0
CONSUMER_TIMEOUT_MARGIN = 60.0          # seconds on top of what the queue's tasks may take
CONSUMER_TIMEOUT_MAX = 7 * 24 * 3600.0  # a week


def consumer_check(consumers: int, ready: int, delivered: int, holding: bool,
                   starvation_applies: bool) -> str:
    """What one answer to the periodic passive declare shows wrong ("" for nothing).

    ``delivered``: deliveries this session took since the last check; ``holding``: some
    are not settled yet, so the worker may have no room for more. Tasks waiting while a
    free consumer gets none is what a quorum queue deleted and declared again under
    the same name looked like on RabbitMQ 3.10: the broker counted our consumers and
    delivered nothing to them. Not judged for a single-active-consumer queue (idle
    consumers are its point) or a queue declared by others (it may be one)."""
    if not consumers:
        return ("the broker counts no consumer of the queue although this worker consumes "
                "it (the queue was deleted and declared again?)")
    if starvation_applies and ready and not delivered and not holding:
        return (f"{ready} task(s) wait in the queue but none came to this free consumer "
                f"since the last check (the queue was deleted and declared again?)")
    return ""


def consumer_arguments(queue: Queue) -> dict:
    """Ask for a consumer_timeout that fits the queue's `timeout`, so long tasks need no
    broker-wide change (RabbitMQ >= 3.12 honours it; 3.10 ignores the argument). A
    delivery may wait behind prefetch - 1 others before it runs."""
    if not queue.prefetch:
        return {}
    seconds = queue.timeout * queue.prefetch + CONSUMER_TIMEOUT_MARGIN
    return {"x-consumer-timeout": int(min(seconds, CONSUMER_TIMEOUT_MAX) * 1000)}


def _level_piece(item) -> bool:
    """A piece of the vhost's delay levels themselves, shared by every queue (not this
    queue's own binding to the delivery exchange, nor the removal of its stray one)."""
    if isinstance(item, delays.Bind):
        return item.source != delays.DELIVER_EXCHANGE
    return isinstance(item, (delays.Exchange, delays.Level))


class Session:
    def __init__(self, queue: Queue, broker: Broker, url: str, connection_name: str, ioloop,
                 ack_batch: int, handler_idle: Callable[[], bool], events, publisher,
                 declare_levels: bool, on_consuming: Callable[["Session"], None],
                 on_message: Callable[[object, object, object, bytes], None],
                 on_closed: Callable[["Session", Verdict], None]):
        self.queue = queue
        self.broker = broker
        self.url = url
        self._name = connection_name
        self._ioloop = ioloop
        self._ack_batch = ack_batch
        self._handler_idle = handler_idle
        self._events = events
        self._publisher = publisher
        self._declare_levels = declare_levels
        self._on_consuming = on_consuming
        # pika's own consumer callback (channel, method, props, body), registered as it
        # is: no frame of ours between pika and the worker on the per-task path. The
        # worker checks that the channel is its session's and guards itself.
        self._on_message = on_message
        self._on_closed = on_closed
        self.connection = None
        self.io: eagerio.Transport | None = None   # the connection's, once it opens
        self.channel = None
        self.settler: Settler | None = None
        self.consumer_tag: str | None = None
        self._declaring = False
        # Declaration, config Binding, or a delay level's delays.Exchange/Level/Bind.
        self._pending: list = []
        self._declaring_item: tuple[object, bool] | None = None
        self._verdict: Verdict | None = None   # why the channel went, if the broker said
        self._misses = 0   # consumer checks in a row that found something wrong
        self._received_checked = 0   # the settler's deliveries as of the last consumer check
        # time.monotonic() since which this session waits for the broker's answer: to the
        # declarations (from the open, and again from each answer until consuming), or
        # to the consumer check in flight; None: it waits for none (``check``)
        self._waiting_since: float | None = None
        self._starvation_applies = not queue.idle_consumers_expected
        self._closing = False
        # Paused by the master (control socket): declare and stay connected, but hold
        # no consumer. ``_can_consume``: declared and qos set, so consuming is one call.
        self.held = False
        self._can_consume = False

    @property
    def consuming(self) -> bool:
        return self.consumer_tag is not None

    def open(self) -> bool:
        """Start connecting; False (after reporting) when the settings cannot be used."""
        try:
            params = connection_parameters(self.broker, self.url, self._name)
        except (ValueError, OSError) as e:
            self._report(Verdict(f"cannot use broker URL {redact(self.url)}: {e}",
                                 exitcodes.WORKER_BAD_SETTINGS))
            return False
        self.connection = pika.SelectConnection(
            params, on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_connection_closed, custom_ioloop=self._ioloop)
        return True

    def stop_consuming(self) -> None:
        """Take no new deliveries; what was delivered is still settled on this channel."""
        if self.consumer_tag and self.channel is not None and self.channel.is_open:
            self.channel.basic_cancel(self.consumer_tag)
        self.consumer_tag = None

    def consume_again(self) -> None:
        """Undo a pause: consume again if this channel got that far (else it will)."""
        self.held = False
        if self._can_consume and self.consumer_tag is None:
            self._consume()

    def close(self) -> None:
        self._closing = True
        if self.connection is not None and self.connection.is_open:
            self.connection.close()

    # --- connection -------------------------------------------------------

    def _on_open_error(self, connection, error) -> None:
        self._report(classify_open_error(error, self.url))

    def _on_connection_open(self, connection) -> None:
        self._waiting_since = time.monotonic()
        self.io = eagerio.install(connection)
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_closed(self, connection, reason) -> None:
        if self.settler is not None:
            self.settler.close()
        self.consumer_tag = None
        self._report(self._verdict or Verdict(f"connection lost: {reason!r}", None))

    def _report(self, verdict: Verdict) -> None:
        if self._on_closed is not None:
            on_closed, self._on_closed = self._on_closed, None  # once per session
            on_closed(self, verdict)

    # --- channel: declare, confirm, qos, consume -------------------------------

    def _on_channel_open(self, channel) -> None:
        self._adopt_channel(channel)
        self._declare()

    def _adopt_channel(self, channel) -> None:
        # This channel never publishes (publisher.py does): an alarm cannot block its acks.
        self.channel = channel
        self.settler = Settler(channel, self._ioloop, self._ack_batch, self._handler_idle,
                               self._events, self._publisher, self.io)
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancelled)

    def _declare(self) -> None:
        # The vhost's delay levels (some ninety declarations) are declared once per host
        # by the master's poller (poller.py), which says so in the shared table before
        # any worker connects: a worker then declares its own queues and its delivery
        # binding only, so a recycled worker's replacement consumes at once, and the
        # broker is not asked ninety questions per worker connection. A worker declares
        # the levels itself (``declare_levels``) when the poller did not, and then before
        # it consumes: a retry publishes into the levels, so they exist before the first
        # task can run.
        items = declarations(self.queue)
        if not self._declare_levels:
            items = [i for i in items if not _level_piece(i)]
        self._pending = items
        self._declaring = True
        self._declare_next()

    def _declare_next(self, _frame=None, legacy: bool = False) -> None:
        self._waiting_since = time.monotonic()
        channel = self.channel
        if channel is None or not channel.is_open:
            return
        if not self._pending:
            self._declaring = False
            if not self._can_consume:
                channel.basic_qos(prefetch_count=self.queue.prefetch,
                                  callback=lambda _: self._consume())
            return
        item = self._pending[0]
        if isinstance(item, Binding):
            self._bind(channel, item)
            return
        if isinstance(item, (delays.Exchange, delays.Level, delays.Bind)):
            self._declare_delay(channel, item)
            return
        args = item.legacy if legacy else item.arguments

        def declared(frame):
            self._pending.pop(0)
            if legacy:
                log.warning("queue %s exists with the arguments of an older workqd (%s) and is "
                            "used as it is; %s", item.name, item.legacy, item.fix)
            self._declare_next()
        self._declaring_item = (item, legacy)
        if item.passive:
            # Someone else's queue, taken as it is: durable or not, any arguments.
            channel.queue_declare(item.name, passive=True, callback=declared)
        else:
            channel.queue_declare(item.name, durable=True, arguments=args, callback=declared)

    def _bind(self, channel, binding: Binding) -> None:
        """Check that the exchange exists (passively: it is not ours), then bind to it."""
        def bound(_frame):
            self._pending.pop(0)
            self._declare_next()
        self._declaring_item = (binding, False)
        channel.exchange_declare(binding.exchange, passive=True, callback=lambda _f: (
            channel.queue_bind(self.queue.name, binding.exchange, binding.routing_key,
                               callback=bound)))

    def _declare_delay(self, channel, item) -> None:
        """One piece of the delay levels: shared by the vhost, declared the same way by
        every worker and client, so each declaration only re-asserts it."""
        def done(_frame):
            self._pending.pop(0)
            self._declare_next()
        self._declaring_item = (item, False)
        if isinstance(item, delays.Exchange):
            channel.exchange_declare(item.name, item.type, durable=True,
                                     arguments=item.arguments, callback=done)
        elif isinstance(item, delays.Level):
            channel.queue_declare(item.name, durable=True, arguments=item.arguments,
                                  callback=done)
        elif item.remove:
            channel.queue_unbind(item.destination, item.source, routing_key=item.routing_key,
                                 arguments=item.arguments, callback=done)
        elif item.to_exchange:
            channel.exchange_bind(item.destination, item.source, routing_key=item.routing_key,
                                  callback=done)
        else:
            channel.queue_bind(item.destination, item.source, routing_key=item.routing_key,
                               arguments=item.arguments, callback=done)

    def _consume(self) -> None:
        if self._closing or not self.channel.is_open:
            return
        self._can_consume = True
        self._waiting_since = None   # every declaration answered
        if self.held:
            self._on_consuming(self)   # the worker sees no consumer_tag: paused
        else:
            self.consumer_tag = self.channel.basic_consume(
                self.queue.name, self._on_message, auto_ack=False,
                arguments=consumer_arguments(self.queue))
            self._on_consuming(self)

    def _on_cancelled(self, frame) -> None:
        # basic.cancel from the broker: the queue was deleted, or its node went down.
        if self.consumer_tag is None:
            return
        self._lost_consumer(f"the broker cancelled the consumer of queue {self.queue.name} "
                            f"(queue deleted or its node down)")

    def _lost_consumer(self, why: str, cut: bool = False) -> None:
        """The broker no longer delivers to our consumer: end this session, so the worker
        declares and consumes again on a fresh connection.

        Not on this channel: nothing on it is known to be sound once the broker dropped
        our consumer, and what it still holds came from the queue that went, so its acks
        could not be taken anyway. (On RabbitMQ 3.10 a quorum queue deleted and declared
        again before the cancel went out keeps the old consumers: counted, never cancelled,
        never delivered to. Only a consumer on a new connection gets its tasks, as
        tests/cluster/test_cluster.py shows.)"""
        self.consumer_tag = None
        self._can_consume = False
        self._events.on_consumer_lost()
        self._end(why, cut)

    def _end(self, why: str, cut: bool = False) -> None:
        """Close this session's connection, to start afresh on a new one (``_report``
        follows from the close)."""
        self._verdict = Verdict(f"{why}: declaring and consuming again on a new connection",
                                None)
        if self.connection is None or not self.connection.is_open:
            return
        terminate = getattr(self.connection, "_terminate_stream", None)
        if cut and terminate is not None:
            # ``cut``: a call on the channel is unanswered, and pika queues the channel's
            # close behind it, so an orderly close would wait as long. The stream is cut
            # as pika cuts it on a missed heartbeat (pika 1.2 to 1.4 have the method).
            terminate(pika.exceptions.AMQPConnectionError(why))
        else:
            self.connection.close()

    def check(self, now: float) -> None:
        """The periodic look at this session (I/O thread, every CONSUMER_CHECK_EVERY): an
        answer awaited too long ends it; else the consumer check, unless one is in flight."""
        if self._waiting_since is not None:
            waited = now - self._waiting_since
            # Not once the session is ending for a cause: that cause is the one told.
            if waited >= CONSUMER_CHECK_UNANSWERED and not self._closing \
                    and self._verdict is None:
                self._waiting_since = None
                what = "the consumer check" if self._can_consume else "the declarations"
                why = (f"queue {self.queue.name}: the broker has not answered {what} for "
                       f"{waited:.0f}s")
                if self.consumer_tag is not None:
                    self._lost_consumer(why, cut=True)
                else:
                    self._end(why, cut=True)
            return
        self._check_consumer(now)

    def _check_consumer(self, now: float) -> None:
        """Ask the broker whether the queue is there and has consumers."""
        if self.consumer_tag is None or self.channel is None or not self.channel.is_open:
            return
        tag = self.consumer_tag

        def counted(frame):
            self._waiting_since = None
            if self.consumer_tag != tag:
                return
            # The settler is replaced only while declaring, before any delivery.
            received = self.settler.received if self.settler is not None else 0
            delivered = received - self._received_checked
            self._received_checked = received
            wrong = consumer_check(frame.method.consumer_count, frame.method.message_count,
                                   delivered, self.settler is not None and self.settler.pending,
                                   self._starvation_applies)
            if not wrong:
                self._misses = 0
                return
            self._misses += 1
            if self._misses >= CONSUMER_CHECK_MISSES:
                self._misses = 0
                self._lost_consumer(f"queue {self.queue.name}: {wrong}")
        # A missing queue closes the channel with 404: the session then starts afresh.
        self._waiting_since = now
        self.channel.queue_declare(self.queue.name, passive=True, callback=counted)

    def _on_channel_closed(self, channel, reason) -> None:
        if channel is not self.channel:
            return
        self.consumer_tag = None
        code = getattr(reason, "reply_code", 0)
        text = getattr(reason, "reply_text", str(reason))
        item, tried_legacy = self._declaring_item or (None, False)
        if (self._declaring and code == 406 and getattr(item, "legacy", None) is not None
                and not tried_legacy and not self._closing and self.connection.is_open):
            if self.settler is not None:
                self.settler.close()
            self.connection.channel(on_open_callback=lambda ch: (
                self._adopt_channel(ch), self._declare_next(legacy=True)))
            return
        if not self._closing and self._verdict is None:   # the first cause is the one told
            self._verdict = classify_channel_close(code, text, self._declaring, self.queue, item)
        if self.settler is not None:
            self.settler.close()
        if self.connection is not None and self.connection.is_open:
            self.connection.close()  # a fresh connection and channel, or the worker's exit
