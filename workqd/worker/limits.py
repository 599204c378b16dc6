"""A worker's side of its queue's cluster-wide limits, on the broker alone.

- **Concurrency cap** (``limits.concurrency: N``): N lock queues,
  ``workq.cap.<queue>.<k>``, each exclusive to the connection that declared it.
  The worker consumes its queue only while it holds one; with one task run at a
  time per worker, at most N run in the cluster. A declare of a lock another
  connection holds fails with 405 RESOURCE_LOCKED, which closes the channel it
  was sent on, so each probe uses a short-lived channel of its own, never the
  consuming one. A lock lives as long as its connection: when a host dies, the
  broker deletes its locks as it drops its connections (heartbeat), and the
  slots are free for the others.
- **Rate** (``limits.rate``, ``burst``): a token bucket on the broker. One
  worker in the cluster holds the generator lock (an exclusive queue, as above)
  and publishes tokens to the token queue a little under the rate
  (limits.RATE_MARGIN, so starts a little late stay within it); the token
  queue keeps at most ``burst`` ready (x-max-length, drop-head). A worker holding
  a delivery consumes one token (prefetch 1) before it starts the task, then
  cancels that consumer unless another delivery waits, and acks the token.
  Waiting workers are the token queue's consumers, so the broker hands tokens
  round-robin: no host starves another.

A ``Limits`` is built per connection, like the session, and dies with it: a
lock, a generator and the tokens awaited all belong to one connection. Runs on
the worker's I/O thread only.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable

from .. import limits as pure
from ..config import Queue
from ..slots import (HOLDS_SLOT, LEADS_RATE, W_LIMIT_WAITED_SLOT, W_LIMIT_WAITED_TOKEN,
                     WAITS_SLOT, WAITS_TOKEN, Slot)

log = logging.getLogger("workqd.worker")

RESOURCE_LOCKED = 405
# Slots tried in one probe round at most: each refused try costs a channel.
PROBES_PER_ROUND = 16
RETRY_AFTER_ERROR = 5.0   # seconds before trying a channel again that the broker refused


class Limits:
    def __init__(self, queue: Queue, ioloop, slot: Slot,
                 may_take_slot: Callable[[], bool], on_slot: Callable[[], None],
                 publish: Callable[[str, Callable[[], bool]], None]):
        """``may_take_slot``: False while this worker still runs a task of an earlier
        connection (its lock went with that connection). ``on_slot``: called when a
        concurrency slot is taken, so the worker consumes. ``publish(queue, wanted)``:
        sends one token on the worker's publishing connection, not on this one, so a
        broker alarm that blocks publishers cannot block this connection's acks."""
        self.queue = queue
        self._limits = queue.limits
        self._connection = None   # the session's, once open
        self._ioloop = ioloop
        self._slot = slot
        self._may_take_slot = may_take_slot
        self._on_slot = on_slot
        self._publish = publish
        self._closed = False
        self._timers: list = []
        # Concurrency: the slot held (1..N), the probe under way, when waiting began.
        self.held: int | None = None
        self._order: list[int] = pure.probe_order(self._limits.concurrency)
        self._cursor = 0
        self._probing = False
        self._waiting_since: float | None = None
        # Rate: deliveries waiting for a token, in order, each with its start callback.
        self._token_queue = (pure.token_queue(queue.name, self._limits.rate_text,
                                              self._limits.burst) if self._limits.rate else "")
        self._waiting: collections.deque = collections.deque()
        self._token_channel = None
        self._token_tag: str | None = None
        self._token_ready = False      # the token queue is declared and qos set
        self._token_opening = False
        # The generator, when this worker leads it.
        self._gen_channel = None
        self._gen_started = 0.0
        self._gen_emitted = 0
        self._gen_probing = False
        self._gen_stopped = False
        self._bits = 0

    # --- life ---------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._connection is not None

    def start(self, connection) -> None:
        """The session's ``connection`` is open and the queue declared."""
        self._connection = connection
        if self._limits.concurrency:
            self._set(WAITS_SLOT, True)
            self._waiting_since = time.monotonic()
            self._probe_slots()
        if self._limits.rate:
            self._open_tokens()
            self._probe_generator()

    def close(self) -> None:
        """The connection is gone (or going): locks, generator and tokens with it."""
        self._closed = True
        for t in self._timers:
            self._ioloop.remove_timeout(t)
        self._timers.clear()
        self.held = None
        self._slot.set_limit(0)

    def stop_generating(self) -> None:
        """The worker is leaving: no more tokens from here (its lock goes with its
        connection, and another worker's generator takes over)."""
        self._gen_stopped = True

    @property
    def may_consume(self) -> bool:
        return not self._limits.concurrency or self.held is not None

    @property
    def waiting_tasks(self) -> int:
        return len(self._waiting)

    def _later(self, seconds: float, callback: Callable[[], None]) -> None:
        def fire():
            self._timers.remove(handle)
            if not self._closed:
                callback()
        handle = self._ioloop.call_later(seconds, fire)
        self._timers.append(handle)

    def _set(self, bit: int, on: bool) -> None:
        self._bits = (self._bits | bit) if on else (self._bits & ~bit)
        self._slot.set_limit(self._bits)

    def _usable(self) -> bool:
        return not self._closed and self._connection is not None and self._connection.is_open

    # --- concurrency cap ----------------------------------------------------------

    def _probe_slots(self) -> None:
        if self.held is not None or self._probing or not self._usable():
            return
        if not self._may_take_slot():
            self._later(pure.probe_pause(), self._probe_slots)
            return
        self._probing = True
        self._try_slot(min(PROBES_PER_ROUND, len(self._order)))

    def _try_slot(self, tries_left: int) -> None:
        if not self._usable():
            return
        if tries_left <= 0:
            self._probing = False
            self._later(pure.probe_pause(), self._probe_slots)
            return
        k = self._order[self._cursor % len(self._order)]
        self._cursor += 1
        name = pure.cap_queue(self.queue.name, k)

        def opened(channel):
            def closed(_ch, reason):
                if self._closed or self.held == k:
                    return
                code = getattr(reason, "reply_code", 0)
                if code == RESOURCE_LOCKED:
                    self._try_slot(tries_left - 1)
                    return
                log.warning("concurrency slot %s: the broker refused it (%s); asking again in "
                            "%gs", name, reason, RETRY_AFTER_ERROR)
                self._probing = False
                self._later(RETRY_AFTER_ERROR, self._probe_slots)

            def taken(_frame):
                channel.close()   # the lock belongs to the connection, not the channel
                self._took_slot(k)
            channel.add_on_close_callback(closed)
            channel.queue_declare(name, durable=False, exclusive=True, auto_delete=True,
                                  callback=taken)
        self._connection.channel(on_open_callback=opened)

    def _took_slot(self, k: int) -> None:
        if self._closed:
            return
        self._probing = False
        self.held = k
        waited = time.monotonic() - (self._waiting_since or time.monotonic())
        self._waiting_since = None
        self._slot.waited(W_LIMIT_WAITED_SLOT, waited)
        self._set(WAITS_SLOT, False)
        self._set(HOLDS_SLOT, True)
        log.info("holding concurrency slot %d of %d of queue %s (waited %.1fs)", k,
                 self._limits.concurrency, self.queue.name, waited)
        self._on_slot()

    # --- rate: taking tokens ------------------------------------------------------

    def take(self, d, start: Callable[[object], None]) -> None:
        """Start ``d`` with ``start(d)`` once a rate token is taken (at once without a rate)."""
        if not self._limits.rate:
            start(d)
            return
        self._waiting.append((d, start, time.monotonic()))
        self._set(WAITS_TOKEN, True)
        self._consume_tokens()

    def take_waiting(self) -> list:
        """The deliveries still waiting for a token, handed back (the worker stops)."""
        out = [d for d, _, _ in self._waiting]
        self._waiting.clear()
        self._set(WAITS_TOKEN, False)
        self._cancel_tokens()
        return out

    def _open_tokens(self) -> None:
        if self._token_opening or not self._usable():
            return
        self._token_opening = True

        def opened(channel):
            self._token_channel = channel
            channel.add_on_close_callback(self._on_token_channel_closed)
            channel.add_on_cancel_callback(self._on_token_cancelled)
            channel.queue_declare(
                self._token_queue, durable=True,
                arguments=pure.token_queue_arguments(self._limits.burst),
                callback=lambda _f: channel.basic_qos(prefetch_count=1, callback=ready))

        def ready(_frame):
            self._token_opening = False
            self._token_ready = True
            if self._waiting:
                self._consume_tokens()
        self._connection.channel(on_open_callback=opened)

    def _on_token_channel_closed(self, channel, reason) -> None:
        if channel is not self._token_channel:
            return
        self._token_channel = None
        self._token_tag = None
        self._token_ready = False
        self._token_opening = False
        if self._closed or not self._usable():
            return
        log.warning("token channel of queue %s closed by the broker (%s); opening it again in "
                    "%gs", self.queue.name, reason, RETRY_AFTER_ERROR)
        self._later(RETRY_AFTER_ERROR, self._open_tokens)

    def _on_token_cancelled(self, _frame) -> None:
        # The token queue went (deleted, or its node down): declare it again.
        self._token_tag = None
        channel = self._token_channel
        if channel is not None and channel.is_open:
            channel.close()

    def _consume_tokens(self) -> None:
        channel = self._token_channel
        if (self._token_tag is not None or not self._token_ready or channel is None
                or not channel.is_open):
            return
        self._token_tag = channel.basic_consume(self._token_queue, self._on_token,
                                                auto_ack=False)

    def _cancel_tokens(self) -> None:
        channel, tag = self._token_channel, self._token_tag
        self._token_tag = None
        if tag is not None and channel is not None and channel.is_open:
            channel.basic_cancel(tag)

    def _on_token(self, channel, method, props, body) -> None:
        if channel is not self._token_channel:
            return
        if not self._waiting:
            # Cancelled while this token was on its way: give it back unused.
            channel.basic_reject(method.delivery_tag, requeue=True)
            return
        d, start, since = self._waiting.popleft()
        if not self._waiting:
            # Cancel before the ack: the broker then sends this consumer nothing more,
            # so no token is held back from the workers that wait.
            self._cancel_tokens()
            self._set(WAITS_TOKEN, False)
        channel.basic_ack(method.delivery_tag)
        self._slot.waited(W_LIMIT_WAITED_TOKEN, time.monotonic() - since)
        start(d)

    # --- rate: the generator ------------------------------------------------------

    def _probe_generator(self) -> None:
        if self._gen_channel is not None or self._gen_probing or not self._usable():
            return
        self._gen_probing = True
        name = pure.generator_lock(self.queue.name, self._limits.rate_text, self._limits.burst)

        def opened(channel):
            def closed(_ch, reason):
                self._gen_probing = False
                was_leading = channel is self._gen_channel
                if was_leading:
                    self._gen_channel = None
                    self._set(LEADS_RATE, False)
                if self._closed:
                    return
                if was_leading:
                    log.warning("rate generator of queue %s stopped: %s", self.queue.name, reason)
                elif getattr(reason, "reply_code", 0) != RESOURCE_LOCKED:
                    log.warning("rate generator lock %s: the broker refused it (%s)", name,
                                reason)
                self._later(pure.probe_pause(), self._probe_generator)

            def taken(_frame):
                self._gen_probing = False
                self._gen_channel = channel
                self._gen_started = time.monotonic()
                self._gen_emitted = 0
                self._set(LEADS_RATE, True)
                log.info("generating the rate tokens of queue %s (%s, burst %d)",
                         self.queue.name, self._limits.rate_text, self._limits.burst)
                self._generate()
            channel.add_on_close_callback(closed)
            channel.queue_declare(name, durable=False, exclusive=True, auto_delete=True,
                                  callback=taken)
        self._connection.channel(on_open_callback=opened)

    def _generate(self) -> None:
        """One turn of the generator: ask how many tokens are ready (a declare),
        then publish the ones due that fit under the burst. Tokens nobody takes are
        not published at all, so an idle rate-limited queue costs the broker one
        declare per turn, not ``rate`` publishes a second."""
        channel = self._gen_channel
        if channel is None or not channel.is_open or self._closed or self._gen_stopped:
            return

        def counted(frame):
            if channel is not self._gen_channel or not channel.is_open or self._closed:
                return
            elapsed = time.monotonic() - self._gen_started
            lim = self._limits
            rate = pure.generated_rate(lim.rate)
            due = pure.tokens_due(elapsed, rate, self._gen_emitted, lim.burst)
            # A token still unsent a turn later (the publishing connection is down) is
            # dropped: sent late, it would add to the next turn's.
            stale_after = time.monotonic() + pure.generator_wait(elapsed, rate, 0)
            wanted = lambda: (not self._closed and not self._gen_stopped  # noqa: E731
                              and time.monotonic() < stale_after)
            for _ in range(pure.tokens_to_publish(due, frame.method.message_count, lim.burst)):
                self._publish(self._token_queue, wanted)
            # Behind by more than a burst (a stalled loop): those are not owed.
            self._gen_emitted = max(self._gen_emitted + due,
                                    int(elapsed * rate) - lim.burst)
            self._later(pure.generator_wait(elapsed, rate, self._gen_emitted),
                        self._generate)
        # A full declare, not a passive one: it answers the same count, and it makes the
        # bucket again should it have expired while the queue was idle.
        channel.queue_declare(self._token_queue, durable=True,
                              arguments=pure.token_queue_arguments(self._limits.burst),
                              callback=counted)
