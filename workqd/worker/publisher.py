"""The worker's publishing connection: retry and dead-letter copies, --wait replies.

RabbitMQ blocks every connection that publishes while a memory or disk alarm
lasts. Publishing on the consuming connection would block its acks too, and
pika would tear it down after ``blocked_connection_timeout``, so every unacked
task would run again. Copies and replies therefore go out on a second
connection, opened when first needed; the consuming connection never
publishes and keeps acking successes through an alarm, while a copy simply
waits for its confirm. Everything here runs on the worker's I/O thread.
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import pika
import pika.spec

from ..broker import Failover, connection_parameters, redact
from ..config import Broker

log = logging.getLogger("workqd.worker")

# Results passed to a publish's callback.
CONFIRMED, REFUSED, RETURNED, LOST = "confirmed", "refused", "unroutable", "lost"


class _Message(NamedTuple):
    routing_key: str
    body: bytes
    props: pika.BasicProperties
    mandatory: bool
    done: Callable[[str], None] | None    # None: nobody waits for the confirm (a reply)
    wanted: Callable[[], bool]            # False: drop it unsent (its original went back)


class Publisher:
    def __init__(self, broker: Broker, urls, name: str, ioloop,
                 on_blocked: Callable[[bool], None]):
        self._broker = broker
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
                done: Callable[[str], None] | None, wanted: Callable[[], bool]) -> None:
        msg = _Message(routing_key, body, props, mandatory, done, wanted)
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
        connection.add_on_connection_blocked_callback(self._on_connection_blocked)
        connection.add_on_connection_unblocked_callback(self._on_connection_unblocked)
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel) -> None:
        channel.add_on_return_callback(self._on_return)
        channel.add_on_close_callback(self._on_channel_closed)

        def confirming(_frame):
            self._channel, self._connecting = channel, False
            self._failover.succeeded()
            backlog, self._backlog = self._backlog, []
            for msg in backlog:
                if msg.wanted():
                    self._send(msg)
        channel.confirm_delivery(self._on_confirm, callback=confirming)

    def _on_open_error(self, connection, error) -> None:
        self._connection, self._connecting = None, False
        self._retry(f"cannot connect to {redact(self._failover.current)} to publish: {error!r}")

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
            self._retry(f"publishing connection lost: {reason!r}")

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

    # --- messages ---------------------------------------------------------------

    def _send(self, msg: _Message) -> None:
        self._channel.basic_publish("", msg.routing_key, msg.body, msg.props,
                                    mandatory=msg.mandatory)
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

    def _on_return(self, channel, method, props, body) -> None:
        # A mandatory copy found no queue; the confirm that follows is an ack.
        for seq, msg in self._unconfirmed.items():
            if (seq not in self._returned and msg.routing_key == method.routing_key
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
