"""Settlement on one consuming channel: coalesced acks, copies awaiting their confirm, replies.

A ``Settler`` is built when its channel opens and closed when the channel goes.
Delivery tags, pending acks and the copies it waits for live on it and die with
it: after a channel is lost the broker has already requeued every unacked
delivery, so whatever finishes later is reported as a lost ack, never acked with
a stale tag on a newer channel. The liveness check lives here and nowhere else
(``usable``). Copies and replies go out on the worker's publishing connections
(publisher.py); the original is acked here once its copy is confirmed.

Every method runs on the worker's I/O thread but ``ack_from_handler``: at prefetch 1
the handler thread writes a success's ack itself, the moment the task returns, so
the broker's next delivery does not wait for the I/O thread to wake first (that
wake-up and the hand-back of the interpreter lock were most of what a task cost
above plain pika's). It sends only under the transport's lock, and only while
``closed`` and the delivery's ``abandoned`` are false, which the I/O thread sets
under that same lock; the I/O thread then settles the delivery as acked.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from typing import Callable, Protocol

import pika

from .. import delays, vocab
from . import publisher as pub
from .intake import Delivery
from .policy import Settlement

log = logging.getLogger("workqd.worker")

ACK_FLUSH_DELAY = 0.005    # seconds a coalesced ack waits at most while the handler is busy

# basic.ack as a whole AMQP 0-9-1 frame: type 1 (method), channel, size 13, class 60,
# method 80, delivery tag, multiple off, frame end. tests/unit/test_settle.py checks it
# against pika's own encoding.
_ACK_FRAME = struct.Struct(">BHIHHQBB")


def ack_frame(channel: int, tag: int) -> bytes:
    return _ACK_FRAME.pack(1, channel, 13, 60, 80, tag, 0, 0xCE)


class Events(Protocol):
    def on_settled(self, d: Delivery, metric: int | None) -> None: ...
    def on_unsettled(self, d: Delivery, why: str) -> None: ...


class Settler:
    def __init__(self, channel, ioloop, batch: int, handler_idle: Callable[[], bool],
                 events: Events, publisher, io=None):
        self.channel = channel
        # The connection's eagerio.Transport: with it, at prefetch 1 (nothing to
        # coalesce), the handler thread acks a success itself (ack_from_handler).
        self._io = io
        self.direct_ack = batch == 1 and io is not None and io.direct
        self._publisher = publisher
        self._ioloop = ioloop
        self._batch = batch                 # acks sent together at most
        self._handler_idle = handler_idle
        self._events = events
        self.closed = False
        self._unsettled: dict[int, Delivery] = {}   # tag -> delivery received here, not settled
        self._ack_tags: list[int] = []               # settled successes whose ack is not sent yet
        self._timer = None
        self._flush_soon = False
        self._copies: dict[int, Delivery] = {}       # tag -> delivery whose copy awaits its confirm
        self.received = 0                            # deliveries taken on this channel
        self._debug = log.isEnabledFor(logging.DEBUG)

    @property
    def usable(self) -> bool:
        return not self.closed and self.channel.is_open

    @property
    def pending(self) -> bool:
        """Something here still needs the broker: an unsettled delivery or a confirm."""
        return bool(self._unsettled or self._copies)

    def receive(self, tag: int, body: bytes, props, task) -> Delivery:
        """A delivery arrived on this channel: it is unsettled until acked, nacked or lost."""
        d = self._unsettled[tag] = Delivery(self, tag, body, props, task)
        self.received += 1
        return d

    def forget(self, d: Delivery) -> None:
        self._unsettled.pop(d.tag, None)

    # --- the handler thread's ack ------------------------------------------------

    def ack_from_handler(self, d: Delivery, count: Callable[[], None]) -> None:
        """Handler thread, for a success at prefetch 1: ``count`` it, then send its ack
        and mark it ``acked``, unless this channel closed or the I/O thread abandoned
        the task (both decided under the transport's lock, as this is). Counted before
        the frame leaves: a worker killed in between has it run and counted again (at
        least once, as everywhere), never acked and not counted."""
        channel = self.channel

        def wanted() -> bool:
            if self.closed or d.abandoned or not channel.is_open:
                return False
            count()
            d.counted = True
            return True
        if self._io.send_now(ack_frame(channel.channel_number, d.tag), wanted):
            d.acked = True

    def abandon(self, d: Delivery) -> bool:
        """I/O thread: settle ``d`` without its handler's result (a timeout, a cancel).
        False when the handler thread has acked it already: its result is on its way."""
        if self._io is None:
            d.abandoned = True
            return True
        with self._io.lock:
            if d.acked:
                return False
            d.abandoned = True
            return True

    def acked_by_handler(self, d: Delivery) -> None:
        """I/O thread: ``d``'s ack went out from the handler thread; it is settled here."""
        self._unsettled.pop(d.tag, None)
        self._io.flush()

    # --- outcomes ---------------------------------------------------------

    def ack(self, d: Delivery) -> bool:
        """Ack a success, coalesced with its neighbours when that is safe."""
        self._unsettled.pop(d.tag, None)
        if self.closed or not self.channel.is_open:   # ``usable``, without a property call
            return False
        if self._batch == 1 and not self._ack_tags:
            self.channel.basic_ack(d.tag)
            return True
        self._ack_tags.append(d.tag)
        if len(self._ack_tags) >= self._batch:
            self.flush()
        elif self._handler_idle():
            # Flush at the end of this loop iteration, so every completion handled
            # in it shares one multiple-ack frame.
            if not self._flush_soon:
                self._cancel_timer()
                self._timer = self._ioloop.call_later(0, self.flush)
                self._flush_soon = True
        elif self._timer is None:
            self._timer = self._ioloop.call_later(ACK_FLUSH_DELAY, self.flush)
        return True

    def requeue(self, d: Delivery) -> None:
        """Give a delivery back unrun (stop, or its copy was refused)."""
        self._unsettled.pop(d.tag, None)
        if self.usable:
            self.channel.basic_nack(d.tag, requeue=True)

    def reject(self, d: Delivery) -> bool:
        """Nack without requeue: the queue's own dead-lettering takes it (or the broker
        drops it). Sent at once, never coalesced with acks."""
        self._unsettled.pop(d.tag, None)
        if not self.usable:
            return False
        self.channel.basic_nack(d.tag, requeue=False)
        return True

    def publish_copy(self, d: Delivery, s: Settlement) -> bool:
        """Publish the retry, dead-letter or postponed copy; the original is acked on its
        confirm. A copy due later goes through the delay levels (delays.py), any delay."""
        if not self.usable:
            self._unsettled.pop(d.tag, None)
            return False
        exchange, routing_key, headers = "", s.target, s.headers
        if s.delay > 0:
            due_ms = s.due_ms if s.due_ms is not None else int(
                (time.time() + s.delay) * 1000)
            exchange, routing_key, headers = delays.routed(s.target, s.headers, s.delay, due_ms)
        p = d.props
        props = pika.BasicProperties(
            content_type=p.content_type, content_encoding=p.content_encoding, headers=headers,
            delivery_mode=2, priority=p.priority, correlation_id=p.correlation_id,
            reply_to=p.reply_to, message_id=d.task.message_id, timestamp=p.timestamp,
            type=p.type, app_id=p.app_id)
        self._copies[d.tag] = d
        self._publisher.publish(routing_key, d.body, props, True,
                                done=lambda result: self._copy_done(d, s, result),
                                wanted=lambda: self.usable and d.tag in self._copies,
                                exchange=exchange)
        return True

    def reply(self, d: Delivery, outcome: str, final: bool) -> None:
        """Tell a waiting ``workq-submit --wait`` (or an allowed reply queue) what became
        of its task."""
        reply_to = d.props.reply_to
        if not reply_to or not isinstance(reply_to, str) or not self.usable:
            return
        body = json.dumps({"message_id": d.task.message_id, "outcome": outcome, "final": final,
                           "seconds": round(d.duration, 3),
                           "error": None if outcome == "success" else d.error})
        self._publisher.reply(reply_to, body.encode(), pika.BasicProperties(
            correlation_id=d.task.message_id, content_type="application/json"))

    # --- coalesced acks -------------------------------------------------------

    def flush(self) -> None:
        self._flush_soon = False
        self._cancel_timer()
        tags, self._ack_tags = self._ack_tags, []
        if not tags or not self.usable:
            return
        last = tags[-1]
        if len(tags) > 1 and not any(t < last for t in self._unsettled):
            # One frame covers every earlier tag: each of them is settled, none
            # awaits a confirm or still runs.
            self.channel.basic_ack(last, multiple=True)
            if self._debug:
                log.debug("acked %d deliveries up to tag %d in one frame", len(tags), last)
        else:
            for tag in tags:
                self.channel.basic_ack(tag)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._ioloop.remove_timeout(self._timer)
            self._timer = None

    # --- copies ---------------------------------------------------------------

    def _copy_done(self, d: Delivery, s: Settlement, result: str) -> None:
        if self._copies.pop(d.tag, None) is None:
            return   # this channel closed meanwhile: the broker redelivers the original
        if result == pub.CONFIRMED:
            self._unsettled.pop(d.tag, None)
            if self.usable:
                self.channel.basic_ack(d.tag)
            self._events.on_settled(d, s.metric)
            if s.metric is not None:   # a postponed task has no outcome to tell yet
                self.reply(d, vocab.OUTCOMES[s.metric], s.final)
            return
        log.error("the copy of task %s to %s was %s; requeueing the original", d.task.message_id,
                  s.target, result)
        self.requeue(d)
        self._events.on_unsettled(d, f"copy {result}")

    def close(self) -> None:
        """The channel is gone: drop every ack and confirm; the broker requeues the originals."""
        if self._io is None:
            self.closed = True
        else:
            with self._io.lock:   # no ack of the handler thread's after this
                self.closed = True
        self._cancel_timer()
        self._ack_tags = []
        for d in self._copies.values():
            log.warning("task %s: its copy was not confirmed before the channel closed; the broker "
                        "redelivers the original (the copy may exist as well)", d.task.message_id)
        self._copies.clear()
        self._unsettled.clear()
