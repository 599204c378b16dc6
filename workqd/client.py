"""``workqd.client``: hand workqd a task from a producer, such as a web application.

    from workqd.client import Client
    client = Client("amqp://app:secret@rabbit1/%2F")          # or Client(config=PATH)
    message_id = client.submit(b"resize 42", queue="thumbnails", delay=90)

``submit`` returns once the broker confirmed the task: persistent, mandatory, with
publisher confirms, the headers workq-submit writes. It raises ``SubmitError`` (and
never blocks longer than ``confirm_timeout``) when the broker refuses, cannot route,
blocks publishers (an alarm) or does not answer.

One connection per process, owned by one I/O thread of the client's, so heartbeats
flow while the application is idle and any number of the application's threads
may submit at once: each hands its message to the I/O thread and waits for its
own confirm. A connection belongs to the process that opened it: after a fork
(a prefork web server) the child notices the new pid and opens its own.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field

import pika
import pika.exceptions
import pika.spec
from pika.adapters.select_connection import IOLoop

from . import amqperrors, cancels, delays, vocab
from . import config as config_mod
from .broker import Failover, connection_parameters, redact

log = logging.getLogger("workqd.client")

CONFIRM_TIMEOUT = 30.0     # seconds a submit waits for its confirm, connecting included
CONNECT_TIMEOUT = 10.0     # per node: TCP, TLS and AMQP handshake


class SubmitError(Exception):
    """The task is not confirmed: it may or may not be in the queue (a timeout), or is
    surely not (refused, unroutable). ``message_id`` says which task."""

    def __init__(self, message: str, message_id: str | None = None):
        super().__init__(message)
        self.message_id = message_id


@dataclass
class _Request:
    exchange: str
    routing_key: str
    body: bytes
    props: pika.BasicProperties
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None      # written by the I/O thread before it sets ``done``


class _Link:
    """One connection, its channel in confirm mode, and the thread that runs its I/O.

    State that dies with its connection lives here: delivery tags, requests waiting
    for their confirm. Every attribute but the events is the I/O thread's once
    ``start`` returned; callers reach it only through ``add_callback_threadsafe``.
    """

    def __init__(self, broker: config_mod.Broker, url: str, name: str):
        self.url = url
        self.ioloop = IOLoop()
        self.opened = threading.Event()
        self.dead = threading.Event()
        self.open_error = ""
        self._params = connection_parameters(broker, url, name)
        self._params.stack_timeout = CONNECT_TIMEOUT
        self._connection = None
        self._channel = None
        self._seq = 0
        self._waiting: dict[int, _Request] = {}
        self._thread = threading.Thread(target=self._run, name="workqd-client-io", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, req: _Request) -> None:
        """From any thread: publish ``req`` on the I/O thread."""
        try:
            self.ioloop.add_callback_threadsafe(lambda: self._send(req))
        except Exception as e:   # the loop is gone: the link died meanwhile
            req.error = f"connection lost ({type(e).__name__})"
            req.done.set()

    def close(self) -> None:
        if not self.dead.is_set():
            try:
                self.ioloop.add_callback_threadsafe(self._close)
            except Exception:
                pass

    # --- the I/O thread ---------------------------------------------------

    def _run(self) -> None:
        try:
            self._connection = pika.SelectConnection(
                self._params, on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error, on_close_callback=self._on_closed,
                custom_ioloop=self.ioloop)
            self.ioloop.start()
        except Exception as e:
            self.open_error = self.open_error or amqperrors.describe(e, CONNECT_TIMEOUT)
            log.debug("client I/O loop ended", exc_info=True)
        finally:
            self._fail_all(self.open_error or "connection lost")
            self.dead.set()
            self.opened.set()   # wakes a caller still waiting for the open
            try:
                self.ioloop.close()
            except Exception:
                pass

    def _on_open(self, connection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel) -> None:
        channel.add_on_return_callback(self._on_return)
        channel.add_on_close_callback(self._on_channel_closed)

        def confirming(_frame):
            self._channel = channel
            self.opened.set()
        channel.confirm_delivery(self._on_confirm, callback=confirming)

    def _on_open_error(self, connection, error) -> None:
        self.open_error = amqperrors.describe(error, CONNECT_TIMEOUT)
        self.ioloop.stop()

    def _on_channel_closed(self, channel, reason) -> None:
        self._fail_all(f"channel closed: {amqperrors.describe(reason, CONNECT_TIMEOUT)}")
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _on_closed(self, connection, reason) -> None:
        self._fail_all(f"connection lost: {amqperrors.describe(reason, CONNECT_TIMEOUT)}")
        self.ioloop.stop()

    def _close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()
        else:
            self.ioloop.stop()

    def _send(self, req: _Request) -> None:
        if self._channel is None or not self._channel.is_open:
            req.error = "connection lost"
            req.done.set()
            return
        self._seq += 1
        self._waiting[self._seq] = req
        self._channel.basic_publish(req.exchange, req.routing_key, req.body, req.props,
                                    mandatory=True)

    def _on_return(self, channel, method, props, body) -> None:
        # A return comes before the confirm of the same publish: mark the oldest
        # unconfirmed request with this message id.
        for req in self._waiting.values():
            if req.props.message_id == props.message_id and req.error is None:
                req.error = (f"unroutable: no queue {req.routing_key!r} "
                             f"({method.reply_code} {method.reply_text})")
                break

    def _on_confirm(self, frame) -> None:
        method = frame.method
        nack = isinstance(method, pika.spec.Basic.Nack)
        tags = [t for t in self._waiting if t <= method.delivery_tag] if method.multiple \
            else [method.delivery_tag]
        for tag in tags:
            req = self._waiting.pop(tag, None)
            if req is None:
                continue
            if nack and req.error is None:
                req.error = "refused by the broker (nack)"
            req.done.set()

    def _fail_all(self, why: str) -> None:
        waiting, self._waiting = self._waiting, {}
        for req in waiting.values():
            req.error = req.error or why
            req.done.set()


_clients: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock held by another thread at the fork stays held in the child forever.
    for client in list(_clients):
        client._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Client:
    """Submit tasks to workqd's queues; safe to share between threads and across forks."""

    def __init__(self, urls: str | list[str] | None = None, *, config: str | None = None,
                 password: str | None = None, password_file: str | None = None,
                 confirm_timeout: float = CONFIRM_TIMEOUT, name: str = "workqd-client"):
        if config is not None:
            broker = config_mod.load(config).broker
        else:
            if isinstance(urls, str):
                urls = [urls]
            checked = tuple(config_mod.amqp_url(u) for u in (urls or [config_mod.DEFAULT_URL]))
            broker = config_mod.Broker(urls=checked)
        if password_file is not None:
            password = config_mod.read_password(password_file)
        if password is None:
            password = os.environ.get("WORKQ_PASSWORD") or None
        if password is not None:
            broker = config_mod.Broker(urls=broker.urls, password=password,
                                       heartbeat=broker.heartbeat, tls=broker.tls)
        self._broker = broker
        self._name = name
        self.confirm_timeout = confirm_timeout
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._link: _Link | None = None
        self._failover = Failover(broker.urls)
        self._levels_declared = False
        self._cancel_log_declared = False
        self._bound: set[str] = set()
        _clients.add(self)

    # --- the API ------------------------------------------------------------

    def submit(self, body: bytes | str, queue: str = "tasks", message_id: str | None = None,
               headers: dict | None = None, priority: int | None = None,
               delay: float | None = None, at: datetime.datetime | None = None,
               expires: float | datetime.datetime | None = None) -> str:
        """Publish one task and wait for the broker's confirm; returns its message id.

        ``delay`` (seconds) or ``at`` (an aware datetime) hold the task back until then;
        ``expires`` (seconds from now, or an aware datetime) makes a task delivered
        later than that dead-lettered unrun as ``expired``."""
        (message_id,) = self.submit_many([body], queue=queue, message_ids=[message_id],
                                         headers=headers, priority=priority, delay=delay,
                                         at=at, expires=expires)
        return message_id

    def submit_many(self, bodies, queue: str = "tasks", message_ids=None,
                    headers: dict | None = None, priority: int | None = None,
                    delay: float | None = None, at: datetime.datetime | None = None,
                    expires: float | datetime.datetime | None = None) -> list[str]:
        """Publish several tasks pipelined (all sent, then all confirms awaited)."""
        bodies = [b.encode() if isinstance(b, str) else bytes(b) for b in bodies]
        ids = list(message_ids or [None] * len(bodies))
        if len(ids) != len(bodies):
            raise ValueError("message_ids must have one id per body")
        ids = [i or uuid.uuid4().hex for i in ids]
        now = time.time()
        due = _due(now, delay, at)
        expiry = _expiry(now, expires)
        requests = [self._request(body, queue, mid, headers, priority, now, due, expiry)
                    for body, mid in zip(bodies, ids)]
        deadline = time.monotonic() + self.confirm_timeout
        link = self._connected(deadline, delayed=due is not None, queue=queue)
        for req in requests:
            link.send(req)
        for req, mid in zip(requests, ids):
            if not req.done.wait(max(0.0, deadline - time.monotonic())):
                link.close()   # the confirm may never come: start afresh next time
                raise SubmitError(f"task {mid}: no confirm from {redact(link.url)} within "
                                  f"{self.confirm_timeout:g}s (a broker alarm or a hung node); "
                                  f"it may or may not be queued", mid)
            if req.error is not None:
                raise SubmitError(f"task {mid}: {req.error}", mid)
        return ids

    def cancel(self, message_id: str) -> None:
        """Cancel a task: every daemon reading the vhost's cancel log within a second or
        so stops it if it runs and never runs it if it waits (even if published later,
        within the log's retention); it is dead-lettered as ``cancelled``."""
        if not isinstance(message_id, str) or not message_id:
            raise ValueError("a message id to cancel is a non-empty string")
        deadline = time.monotonic() + self.confirm_timeout
        link = self._connected(deadline, delayed=False, queue="", cancel_log=True)
        now_ms = int(time.time() * 1000)
        req = _Request("", cancels.STREAM, message_id.encode("utf-8", "surrogatepass"),
                       pika.BasicProperties(delivery_mode=2, message_id=message_id,
                                            headers={cancels.H_CANCELLED_MS: now_ms}))
        link.send(req)
        if not req.done.wait(max(0.0, deadline - time.monotonic())):
            link.close()
            raise SubmitError(f"cancel of {message_id}: no confirm within "
                              f"{self.confirm_timeout:g}s", message_id)
        if req.error is not None:
            raise SubmitError(f"cancel of {message_id}: {req.error}", message_id)

    def close(self) -> None:
        with self._lock:
            if self._link is not None and self._pid == os.getpid():
                self._link.close()
            self._link = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals ----------------------------------------------------------

    def _request(self, body: bytes, queue: str, mid: str, headers: dict | None,
                 priority: int | None, now: float, due: float | None,
                 expiry: float | None) -> _Request:
        h = dict(headers or {})
        h[vocab.H_SUBMITTED_MS] = int(now * 1000)
        if expiry is not None:
            h[vocab.H_EXPIRES_MS] = int(expiry * 1000)
        props = dict(delivery_mode=2, message_id=mid, priority=priority)
        if due is None:
            return _Request("", queue, body, pika.BasicProperties(headers=h, **props))
        exchange, key, h = delays.routed(queue, h, due - now, int(due * 1000))
        return _Request(exchange, key, body, pika.BasicProperties(headers=h, **props))

    def _forget_parent(self) -> None:
        """In a forked child: the parent's connection and lock are not ours."""
        self._lock = threading.Lock()
        self._link = None
        self._pid = os.getpid()

    def _connected(self, deadline: float, delayed: bool, queue: str,
                   cancel_log: bool = False) -> _Link:
        with self._lock:
            if self._pid != os.getpid():
                self._forget_parent()
            if delayed:
                self._prepare(lambda ch: self._prepare_delays(ch, queue),
                              self._levels_declared and queue in self._bound)
            if cancel_log:
                self._prepare(self._prepare_cancel_log, self._cancel_log_declared)
            link = self._link
            if link is not None and not link.dead.is_set():
                return link
            errors = []
            for _ in range(len(self._broker.urls)):
                url = self._failover.current
                link = _Link(self._broker, url, self._name)
                link.start()
                link.opened.wait(max(0.0, deadline - time.monotonic()))
                if link.opened.is_set() and not link.dead.is_set():
                    self._failover.succeeded()
                    self._link = link
                    return link
                link.close()
                errors.append(f"{redact(url)}: {link.open_error or 'no answer in time'}")
                self._failover.failed()
                if time.monotonic() >= deadline:
                    break
            raise SubmitError("cannot connect to " + "; ".join(errors))

    def _prepare(self, declare, done: bool) -> None:
        """Declarations a kind of submit needs, once per client, on a short connection of
        its own: they are rare, and a refusal must not close the publishing channel."""
        if done:
            return
        url = self._failover.current
        try:
            conn = pika.BlockingConnection(connection_parameters(self._broker, url, self._name))
        except pika.exceptions.AMQPError as e:
            raise SubmitError(f"cannot connect to {redact(url)}: "
                              f"{amqperrors.describe(e, CONNECT_TIMEOUT)}") from None
        try:
            declare(conn.channel())
        except pika.exceptions.AMQPError as e:
            raise SubmitError(f"cannot declare what this submit needs: "
                              f"{amqperrors.describe(e, CONNECT_TIMEOUT)}") from None
        finally:
            if conn.is_open:
                conn.close()

    def _prepare_delays(self, ch, queue: str) -> None:
        """The vhost's delay levels, and the binding that brings this queue its due tasks."""
        try:
            delays.prepare(ch, queue)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != 404:
                raise
            raise SubmitError(f"unroutable: no queue {queue!r} (a delayed task needs its "
                              f"queue to exist now)") from None
        self._levels_declared = True
        self._bound.add(queue)

    def _prepare_cancel_log(self, ch) -> None:
        ch.queue_declare(cancels.STREAM, durable=True, arguments=cancels.stream_arguments())
        self._cancel_log_declared = True


def _due(now: float, delay: float | None, at: datetime.datetime | None) -> float | None:
    """Epoch seconds a task is due, or None for at once."""
    if delay is not None and at is not None:
        raise ValueError("give delay or at, not both")
    if at is not None:
        if at.tzinfo is None:
            raise ValueError("at must carry its UTC offset (an aware datetime)")
        due = at.timestamp()
    elif delay is not None:
        delays.whole_seconds(delay)   # the range check
        due = now + delay
    else:
        return None
    if due - now > delays.MAX_DELAY:
        raise ValueError("a task can be held back at most 100 years")
    return due if due - now >= 0.5 else None


def _expiry(now: float, expires) -> float | None:
    if expires is None:
        return None
    if isinstance(expires, datetime.datetime):
        if expires.tzinfo is None:
            raise ValueError("expires must carry its UTC offset (an aware datetime)")
        return expires.timestamp()
    if isinstance(expires, bool) or not isinstance(expires, (int, float)) or expires <= 0:
        raise ValueError(f"expires must be seconds > 0 or an aware datetime, got {expires!r}")
    return now + expires
