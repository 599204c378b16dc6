"""The worker's publishing connections: retry and dead-letter copies, and replies.

RabbitMQ blocks every connection that publishes while a memory or disk alarm
lasts. Publishing on the consuming connection would block its acks too, and
pika would tear it down after ``blocked_connection_timeout``, so every unacked
task would run again. Copies therefore go out on a second connection, opened
when first needed; the consuming connection never publishes and keeps acking
successes through an alarm, while a copy simply waits for its confirm.

Replies (the outcome sent to a task's ``reply_to``) go out on a third
connection of their own. Their target is chosen by whoever published the task,
and a reply the broker refuses can take down the channel or the whole
connection it was sent on (RabbitMQ 3.10 closes the connection on a malformed
direct reply-to name): on the copies' connection that would lose every confirm
still awaited, and the originals would run again. By default only direct
reply-to names (``amq.rabbitmq.reply-to.*``, what ``workq-submit --wait``
consumes) are replied to; a queue's ``allow_reply_queues`` allows named queues.
Everything here runs on the worker's I/O thread.
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import pika
import pika.spec

from .. import eagerio
from ..broker import Failover, connection_parameters, redact
from ..config import Broker

log = logging.getLogger("workqd.worker")

# Results passed to a publish's callback.
CONFIRMED, REFUSED, RETURNED, LOST = "confirmed", "refused", "unroutable", "lost"

# The broker gives a consumer of the pseudo-queue amq.rabbitmq.reply-to a name
# under this prefix; only that consumer can receive what is published to it.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to."


def reply_allowed(reply_to: str, allow_reply_queues: bool) -> bool:
    """Whether a task's outcome may be published to ``reply_to``: a direct reply-to
    name always, any other queue only when its queue's config says so."""
    return allow_reply_queues or (reply_to.startswith(DIRECT_REPLY_TO)
                                  and len(reply_to) > len(DIRECT_REPLY_TO))


class _Message(NamedTuple):
    exchange: str                         # "" (the default exchange) or a delay level's
    routing_key: str
    body: bytes
    props: pika.BasicProperties
    mandatory: bool
    done: Callable[[str], None] | None    # None: nobody waits for the confirm (a reply)
    wanted: Callable[[], bool]            # False: drop it unsent (its original went back)


class _Link:
    """One publishing connection and its channel: opened when something is to be
    sent, opened again after a loss while something still waits."""

    confirms = True          # the channel is in confirm mode and mandatory returns are tracked
    what = "publishing"      # names the connection in log lines

    def __init__(self, broker: Broker, urls, name: str, ioloop,
                 on_blocked: Callable[[bool], None],
                 on_idle: Callable[[], None] | None = None):
        """``on_idle``: called when the last message waiting here was sent (and confirmed,
        with confirms) or given up, outside ``publish``, whose caller can look itself."""
        self._broker = broker
        self._on_idle = on_idle
        self._failover = Failover(urls)
        self._name = name
        self._ioloop = ioloop
        self._on_blocked = on_blocked
        self._connection = None
        self._channel = None
        self._connecting = False
        self._closing = False
        self._backlog: list[_Message] = []
        self._seq = 0
        self._unconfirmed: dict[int, _Message] = {}
        self._returned: set[int] = set()
        self.blocked = False

    @property
    def idle(self) -> bool:
        """Nothing waits to be sent or confirmed."""
        return not self._backlog and not self._unconfirmed

    @property
    def closed(self) -> bool:
        return self._connection is None or self._connection.is_closed

    def prefer(self, url: str) -> None:
        """Publish to the node the consumer is on, when (re)connecting."""
        self._failover = Failover([url, *[u for u in self._broker.urls if u != url]])

    def publish(self, routing_key: str, body: bytes, props, mandatory: bool,
                done: Callable[[str], None] | None, wanted: Callable[[], bool],
                exchange: str = "") -> None:
        msg = _Message(exchange, routing_key, body, props, mandatory, done, wanted)
        if self._channel is not None and self._channel.is_open:
            self._send(msg)
        else:
            self._backlog.append(msg)
            self._connect()

    def close(self) -> None:
        self._closing = True
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    # --- connection ----------------------------------------------------------

    def _connect(self) -> None:
        if self._connecting or self._closing:
            return
        self._connecting = True
        if self._connection is not None and self._connection.is_open:
            # Its channel went, the connection did not (a reply the broker refused).
            self._connection.channel(on_open_callback=self._on_channel_open)
            return
        url = self._failover.current
        try:
            params = connection_parameters(self._broker, url, self._name)
        except (ValueError, OSError) as e:
            self._connecting = False
            self._fail_all(f"cannot use broker URL {redact(url)}: {e}")
            return
        # Wait out an alarm: tearing the connection down would only repeat the copies.
        params.blocked_connection_timeout = None
        self._connection = pika.SelectConnection(
            params, on_open_callback=self._on_open, on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed, custom_ioloop=self._ioloop)

    def _on_open(self, connection) -> None:
        eagerio.install(connection)
        connection.add_on_connection_blocked_callback(self._on_connection_blocked)
        connection.add_on_connection_unblocked_callback(self._on_connection_unblocked)
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel) -> None:
        channel.add_on_close_callback(self._on_channel_closed)
        if not self.confirms:
            self._ready(channel)
            return
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._ready(channel))

    def _ready(self, channel) -> None:
        self._channel, self._connecting = channel, False
        self._failover.succeeded()
        backlog, self._backlog = self._backlog, []
        for msg in backlog:
            if msg.wanted():
                self._send(msg)
        self._report_idle()

    def _on_open_error(self, connection, error) -> None:
        self._connection, self._connecting = None, False
        self._retry(f"cannot connect to {redact(self._failover.current)} to publish "
                    f"{self.what}: {error!r}")

    def _on_channel_closed(self, channel, reason) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _on_closed(self, connection, reason) -> None:
        self._connection, self._channel, self._connecting = None, None, False
        if self.blocked:
            self._set_blocked(False)
        lost, self._unconfirmed = self._unconfirmed, {}
        self._returned.clear()
        self._seq = 0
        for msg in lost.values():
            if msg.done is not None:
                msg.done(LOST)
        if not self._closing:
            self._retry(f"{self.what} connection lost: {reason!r}")
        self._report_idle()

    def _retry(self, why: str) -> None:
        self._backlog = [m for m in self._backlog if m.wanted()]
        if not self._backlog or self._closing:
            return   # reconnect when something is to be sent again
        delay = self._failover.failed()
        log.warning("%s; %d message(s) wait, reconnecting in %.1fs", why, len(self._backlog),
                    delay)
        self._ioloop.call_later(delay, self._connect)

    def _fail_all(self, why: str) -> None:
        log.error("%s", why)
        backlog, self._backlog = self._backlog, []
        for msg in backlog:
            if msg.done is not None:
                msg.done(LOST)
        self._report_idle()

    # --- messages ---------------------------------------------------------------

    def _send(self, msg: _Message) -> None:
        self._channel.basic_publish(msg.exchange, msg.routing_key, msg.body, msg.props,
                                    mandatory=msg.mandatory)
        if not self.confirms:
            return
        self._seq += 1   # in confirm mode every publish on the channel takes a tag
        if msg.done is not None:
            self._unconfirmed[self._seq] = msg

    def _on_confirm(self, frame) -> None:
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        seqs = (sorted(t for t in self._unconfirmed if t <= method.delivery_tag)
                if method.multiple else [method.delivery_tag])
        for seq in seqs:
            msg = self._unconfirmed.pop(seq, None)
            if msg is None:
                continue
            returned = seq in self._returned
            self._returned.discard(seq)
            msg.done(RETURNED if returned else CONFIRMED if ok else REFUSED)
        self._report_idle()

    def _report_idle(self) -> None:
        # A stopping worker leaves only once nothing waits here; a reply sent as its
        # connection opens, for one, is out only after the caller last looked.
        if self._on_idle is not None and self.idle:
            self._on_idle()

    def _on_return(self, channel, method, props, body) -> None:
        # A mandatory copy found no queue; the confirm that follows is an ack.
        for seq, msg in self._unconfirmed.items():
            if (seq not in self._returned and msg.routing_key == method.routing_key
                    and msg.exchange == method.exchange
                    and msg.props.message_id == props.message_id):
                self._returned.add(seq)
                return

    def _on_connection_blocked(self, connection, frame) -> None:
        self._set_blocked(True)

    def _on_connection_unblocked(self, connection, frame) -> None:
        self._set_blocked(False)

    def _set_blocked(self, blocked: bool) -> None:
        if blocked == self.blocked:
            return
        self.blocked = blocked
        if blocked:
            log.warning("the broker blocks publishing (a memory or disk alarm): retry and "
                        "dead-letter copies wait; successful tasks are still acked")
        else:
            log.info("the broker accepts publishing again")
        self._on_blocked(blocked)


class Publisher(_Link):
    """Copies on this connection, where the originals' acks wait for their confirms;
    replies on a second one (``_Replies``), so no reply can cost a confirm."""

    def __init__(self, broker: Broker, urls, name: str, ioloop,
                 on_blocked: Callable[[bool], None], allow_reply_queues: bool = False,
                 on_idle: Callable[[], None] | None = None):
        """``name``: the worker's, to which each connection's role is added. ``on_idle``:
        called when neither connection has anything left to send or confirm."""
        def both_idle() -> None:
            if self.idle:
                on_idle()

        report = None if on_idle is None else both_idle
        super().__init__(broker, urls, f"{name} (publishing)", ioloop, on_blocked, report)
        self._replies = _Replies(broker, urls, f"{name} (replies)", ioloop, None, report)
        self._allow_reply_queues = allow_reply_queues
        self._warned_reply_queue = False   # one warning per worker life, not one per task

    @property
    def idle(self) -> bool:
        """Nothing waits to be sent or confirmed, copies and replies alike."""
        return super().idle and self._replies.idle

    def prefer(self, url: str) -> None:
        super().prefer(url)
        self._replies.prefer(url)

    def close(self) -> None:
        super().close()
        self._replies.close()

    def reply(self, reply_to: str, body: bytes, props) -> bool:
        """Send a task's outcome to its ``reply_to``, unless that is a named queue this
        queue's config does not allow; never mandatory, never confirmed."""
        if not reply_allowed(reply_to, self._allow_reply_queues):
            if not self._warned_reply_queue:
                self._warned_reply_queue = True
                log.warning("task %s asks for its outcome in queue %r (reply_to); no reply sent: "
                            "outcomes go only to direct reply-to names (%s*) unless the queue "
                            "sets allow_reply_queues: true (said once per worker)",
                            props.correlation_id, reply_to, DIRECT_REPLY_TO)
            return False
        self._replies.publish(reply_to, body, props, False, done=None, wanted=_always)
        return True


class _Replies(_Link):
    """The reply connection: no confirms (nobody waits for them), and a refusal, whether
    it closes the channel or the connection, loses at most replies sent on it."""

    confirms = False
    what = "reply"
    # Replies wait while this connection is down; nothing else bounds them (their tasks
    # are acked), so the oldest go first past this many.
    BACKLOG_MAX = 1000
    _dropping = False   # the oldest waiting replies are being dropped (said once)

    def publish(self, routing_key: str, body: bytes, props, mandatory: bool,
                done: Callable[[str], None] | None, wanted: Callable[[], bool],
                exchange: str = "") -> None:
        if len(self._backlog) >= self.BACKLOG_MAX:
            del self._backlog[0]
            if not self._dropping:
                self._dropping = True
                log.warning("%d replies wait for the reply connection: dropping the oldest "
                            "until it is back", self.BACKLOG_MAX)
        super().publish(routing_key, body, props, mandatory, done, wanted, exchange)

    def _ready(self, channel) -> None:
        self._dropping = False
        super()._ready(channel)

    def _on_channel_closed(self, channel, reason) -> None:
        # Only the channel went: another one on the same connection when a reply waits.
        self._channel = None
        self._connecting = False
        if self._closing or self._connection is None or not self._connection.is_open:
            return
        log.warning("the broker closed the reply channel (%s): replies it had not taken are "
                    "lost; retry and dead-letter copies are not affected", reason)
        if self._backlog:
            self._connect()

    def _on_closed(self, connection, reason) -> None:
        if not self._closing:
            log.warning("reply connection lost (%r): replies the broker had not taken are lost "
                        "(a reply_to it refuses closes it); retry and dead-letter copies are not "
                        "affected", reason)
        super()._on_closed(connection, reason)

    def _set_blocked(self, blocked: bool) -> None:
        # The copies' connection reports an alarm; a reply simply waits it out.
        self.blocked = blocked


def _always() -> bool:
    return True
