"""``workqd.client``: hand workqd a task from a producer, such as a web application.

    from workqd.client import Client
    client = Client("amqp://app:secret@rabbit1/%2F")          # or Client(config=PATH)
    message_id = client.submit(b"resize 42", queue="thumbnails", delay=90)

``submit`` returns once the broker confirmed the task: persistent, mandatory, with
publisher confirms, the headers workq-submit writes. It raises ``SubmitError`` (and
never blocks longer than ``confirm_timeout``) when the broker refuses, cannot route,
blocks publishers (an alarm) or does not answer.

``submit``, ``submit_many`` and ``cancel`` share one connection per process, owned by one I/O
thread of the client's, so heartbeats flow while the application is idle and any
number of the application's threads may submit at once: each hands its message to
the I/O thread and waits for its own confirm. A connection belongs to the process
that opened it: after a fork (a prefork web server) the child notices the new pid
and opens its own. A batch (``submit_batch``; workq-submit is a command line over
it) runs in its caller's thread on a connection of its own, pipelined and failing
over between nodes (see "batches" below).
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import pika
import pika.exceptions
import pika.spec
from pika.adapters.select_connection import IOLoop

from . import amqperrors, cancels, delays, eagerio, vocab
from . import config as config_mod
from .broker import Failover, connection_parameters, declarations, queue_arguments, redact
from .msgid import new_message_ids

log = logging.getLogger("workqd.client")

CONFIRM_TIMEOUT = 30.0     # seconds a submit waits for its confirm, connecting included
CONNECT_TIMEOUT = 10.0     # per node: TCP, TLS and AMQP handshake


class SubmitError(Exception):
    """The task is not confirmed: it may or may not be in the queue (a timeout), or is
    surely not (refused, unroutable). ``message_id`` says which task."""

    def __init__(self, message: str, message_id: str | None = None,
                 kind: str = "not_confirmed"):
        super().__init__(message)
        self.message_id = message_id
        self.kind = kind     # UNREACHABLE when the broker could not be reached at all


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
        self._io: eagerio.Transport | None = None   # set when the connection opens
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
        self._io = eagerio.install(connection)
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
        with self._io.corked():   # its three frames in one send
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
                 confirm_timeout: float = CONFIRM_TIMEOUT, name: str = "workqd-client",
                 broker: config_mod.Broker | None = None):
        # A broker section already read (workq-submit's -c, --url and password) is
        # taken as it is: its password sources were weighed already.
        given = broker is not None
        if given:
            pass
        elif config is not None:
            broker = config_mod.load(config).broker
        else:
            if isinstance(urls, str):
                urls = [urls]
            checked = tuple(config_mod.amqp_url(u) for u in (urls or [config_mod.DEFAULT_URL]))
            broker = config_mod.Broker(urls=checked)
        if password_file is not None:
            password = config_mod.read_password(password_file)
        if password is None and not given:
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
        self._nodes: list[Node] | None = None
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
        # submit_many of one task, on the client's own connection kept open by its
        # I/O thread: a submit costs a round trip, not a connection.
        return self.submit_many([body], queue, [message_id] if message_id else None,
                                headers, priority, delay, at, expires)[0]

    def submit_many(self, bodies, queue: str = "tasks", message_ids=None,
                    headers: dict | None = None, priority: int | None = None,
                    delay: float | None = None, at: datetime.datetime | None = None,
                    expires: float | datetime.datetime | None = None) -> list[str]:
        """Publish several tasks pipelined on the process's one connection (all sent, then
        all confirms awaited); returns their ids once every one is confirmed, else raises
        SubmitError naming the first one not. A batch too big to wait for as a whole, or
        one that should fail over mid-way, is submit_batch's."""
        bodies = [b.encode() if isinstance(b, str) else bytes(b) for b in bodies]
        ids = list(message_ids or [None] * len(bodies))
        if len(ids) != len(bodies):
            raise ValueError("message_ids must have one id per body")
        now = time.time()
        # An id made here carries the publish time; one the caller chose needs the header.
        stamped = [not i for i in ids]
        fresh = iter(new_message_ids(sum(stamped), int(now * 1000)))
        ids = [i or next(fresh) for i in ids]
        due = _due(now, delay, at)
        expiry = _expiry(now, expires)
        requests = [self._request(body, queue, mid, headers, priority, now, due, expiry, st)
                    for body, mid, st in zip(bodies, ids, stamped)]
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

    def submit_batch(self, tasks: list[Outgoing], queue: str = "tasks", *,
                     declare: config_mod.Queue | None = None, headers: dict | None = None,
                     priority: int | None = None, due: float | None = None,
                     expires_ms: int | None = None, wait: bool = False,
                     wait_timeout: float | None = None,
                     hooks: BatchHooks | None = None) -> Batch:
        """Run a batch to its end and hand it back: which tasks were confirmed, refused or
        not confirmed, and with ``wait`` their outcomes (workq-submit reports from it).
        ``declare`` declares the queue first as the daemon would; ``due`` (epoch seconds)
        must have the delay levels ready (prepare_due)."""
        return Batch(self.nodes(), queue, tasks, declare=declare, headers=headers,
                     priority=priority, due=due, expires_ms=expires_ms, wait=wait,
                     wait_timeout=wait_timeout, confirm_timeout=self.confirm_timeout,
                     hooks=hooks).run()

    def prepare_due(self, queue: str, declare: config_mod.Queue | None = None) -> None:
        """The vhost's delay levels and the queue's delivery binding, before the first
        delayed publish of a batch (the first node that answers)."""
        conn, node, errors = connect_first(self.nodes(), self.confirm_timeout)
        if conn is None:
            raise SubmitError(f"cannot connect to {'; '.join(errors)}", kind=UNREACHABLE)
        try:
            ch = conn.channel()
            if declare is not None:
                ch.queue_declare(queue, durable=True, arguments=queue_arguments(declare))
            delays.prepare(ch, queue)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                raise SubmitError(f"no queue {queue} on {node.label}: a delayed task needs "
                                  f"its queue to exist now") from None
            raise SubmitError(f"cannot prepare delayed delivery on {node.label}: "
                              f"{describe(e)}") from None
        except pika.exceptions.AMQPError as e:
            raise SubmitError(f"cannot prepare delayed delivery on {node.label}: "
                              f"{describe(e)}", kind=UNREACHABLE) from None
        finally:
            close_quietly(conn)

    def nodes(self) -> list[Node]:
        """Connection parameters for every broker URL, in order (built once)."""
        if self._nodes is None:
            self._nodes = [node_for(self._broker, url, self._name, self.confirm_timeout)
                           for url in self._broker.urls]
        return self._nodes

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
                 expiry: float | None, stamped: bool) -> _Request:
        h = dict(headers or {})
        if not stamped:
            h[vocab.H_SUBMITTED_MS] = int(now * 1000)
        if expiry is not None:
            h[vocab.H_EXPIRES_MS] = int(expiry * 1000)
        props = dict(delivery_mode=2, message_id=mid, priority=priority)
        if due is None:
            return _Request("", queue, body, pika.BasicProperties(headers=h or None, **props))
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


# --- batches ---------------------------------------------------------------
#
# A batch (submit_batch, workq-submit) runs in the caller's thread on an I/O loop and a
# connection of its own: up to WINDOW tasks in flight, each confirm freeing room for
# more, so 20,000 tasks cost a few round trips. When a connection is lost mid-batch the
# tasks still waiting for their confirm are published again on the next node
# (at-least-once: they may arrive twice, with the same message id). Every wait has a
# deadline: a node gets CONNECT_TIMEOUT to answer, and a connection that confirms
# nothing for confirm_timeout seconds is given up, and so is a broker that keeps
# blocking publishers (a memory or disk alarm) for that long.

WINDOW = 5000          # unconfirmed messages in flight at most
REPLY_TO = "amq.rabbitmq.reply-to"
FINAL_OUTCOMES = {"success", "dead_letter"}
CLOSE_TIMEOUT = 5.0    # a clean close may take this long, then the batch just leaves

# Why a batch gave up (Batch.error[0]).
UNREACHABLE = "unreachable"       # no node took the connection, or an alarm before any confirm
NOT_CONFIRMED = "not_confirmed"   # lost or closed under the batch, or blocked past the deadline
MISMATCH = "mismatch"             # the queue exists with other arguments than declared
WAIT_TIMEOUT = "wait_timeout"     # wait_timeout passed before every outcome arrived
INTERRUPTED = "interrupted"       # KeyboardInterrupt


class Outgoing(NamedTuple):
    """One task of a batch (the handler side's view is workqd.task.Task); a tuple, as a
    batch of a million is built in one go."""
    message_id: str           # "": the batch makes one when it first publishes the task
    body: bytes
    line: int | None = None   # line number in workq-submit --file, for the operator

    def name(self) -> str:
        if not self.message_id:   # never published: no id was made
            return "(never published)" if self.line is None else f"line {self.line}"
        return self.message_id if self.line is None else f"{self.message_id} (line {self.line})"


class _Burst:
    """The properties every task of one burst shares, encoded once: pika would encode
    the headers table again for every task, and only the message id differs."""

    def __init__(self, props: pika.BasicProperties):
        self.props = props
        marker = os.urandom(16).hex()
        props.message_id = marker
        joined = b"".join(props.encode())
        cut = joined.find(bytes([len(marker)]) + marker.encode())
        self.fast = cut >= 0 and joined.count(marker.encode()) == 1
        self.prefix = joined[:cut]
        self.suffix = joined[cut + 1 + len(marker):]

    def of(self, message_id: str) -> pika.BasicProperties:
        mid = message_id.encode("utf-8")
        if not self.fast or len(mid) > 255:
            # pika's own encoding, and its own error for an id too long
            return pika.BasicProperties(**{**vars(self.props), "message_id": message_id})
        return _Encoded(self.prefix + bytes([len(mid)]) + mid + self.suffix, message_id)


class _Encoded(pika.BasicProperties):
    """Properties already encoded (pika's frame writer asks only for ``encode``)."""

    def __init__(self, encoded: bytes, message_id: str):   # noqa: D107 - no pika init: its cost is the point
        self._encoded = encoded
        self.message_id = message_id

    def encode(self):
        return [self._encoded]


class Node(NamedTuple):
    label: str                        # the URL without its password
    params: pika.ConnectionParameters


def node_for(broker: config_mod.Broker, url: str, name: str, confirm_timeout: float) -> Node:
    """Connection parameters for one URL (raises what pika and ssl raise for bad ones)."""
    params = connection_parameters(broker, url, name)
    params.stack_timeout = CONNECT_TIMEOUT
    # pika's own backstop; the batch's timer gives up first, with a clearer line.
    params.blocked_connection_timeout = confirm_timeout + CLOSE_TIMEOUT
    return Node(redact(url), params)


def connect_first(nodes: list[Node], confirm_timeout: float
                  ) -> tuple[pika.BlockingConnection | None, Node | None, list[str]]:
    """A blocking connection to the first node that takes it (workq-submit --requeue-dead,
    workqctl dead)."""
    conn, node, errors = None, None, []
    for node in nodes:
        node.params.blocked_connection_timeout = confirm_timeout
        try:
            conn = pika.BlockingConnection(node.params)
            break
        except pika.exceptions.AMQPError as e:
            errors.append(f"{node.label}: {amqperrors.describe(e, CONNECT_TIMEOUT)}")
            if isinstance(e, (pika.exceptions.ProbableAuthenticationError,
                              pika.exceptions.ProbableAccessDeniedError)):
                break
    return conn, node, errors


def close_quietly(conn) -> None:
    """Close a blocking connection that may already be gone; its errors no longer matter."""
    if conn.is_open:
        try:
            conn.close()
        except pika.exceptions.AMQPError:
            pass


class BatchHooks:
    """What a batch tells its caller while it runs, all on the caller's thread; the
    defaults say nothing (workq-submit's print)."""

    def progress(self, confirmed: int, total: int) -> None:
        """After each burst of confirms."""

    def tick(self, confirmed: int, total: int) -> None:
        """Once a second."""

    def blocked(self, node: str, reason: str, confirm_timeout: float) -> None:
        """The broker blocks publishers (an alarm)."""

    def unblocked(self, node: str) -> None:
        pass

    def failover(self, node: str, why: str, todo: int, lost: int) -> None:
        """A connection was lost mid-batch: ``todo`` tasks go to the next node, ``lost``
        of them were published already and may arrive twice."""

    def outcome(self, reply: dict, final: bool) -> None:
        """With wait: a worker's reply for one task (not final: it will be retried)."""

    def finished(self) -> None:
        pass


class _Session:
    """One connection of a batch and its channel. Confirm tags, the blocked state and
    the reply consumer live and die here; the Batch decides what happens next."""

    def __init__(self, batch: "Batch", node: Node):
        self.batch = batch
        self.node = node
        self.channel = None
        self.io: eagerio.Transport | None = None   # set when the connection opens
        self.ready = False         # channel open, confirms on, queue declared
        self.abandoned = False     # given up on: every later callback is ignored
        self.blocked = False
        self.seq = 0               # publish sequence on the channel (= confirm tag)
        self.low = 1               # tags below were all settled by a multiple confirm
        self.pending: dict[int, int] = {}   # confirm tag -> task index
        self.conn = pika.SelectConnection(node.params, on_open_callback=self._on_open,
                                          on_open_error_callback=self._on_open_error,
                                          on_close_callback=self._on_closed,
                                          custom_ioloop=batch.ioloop)
        self.conn.add_on_connection_blocked_callback(self._on_blocked)
        self.conn.add_on_connection_unblocked_callback(self._on_unblocked)

    def abandon(self) -> None:
        """Forget this connection; close it politely if it can still answer."""
        self.abandoned = True
        if self.conn.is_open and not self.blocked:
            try:
                self.conn.close()
            except pika.exceptions.AMQPError:
                pass

    def _on_open_error(self, conn, error) -> None:
        if not self.abandoned:
            self.batch.connect_failed(self, error)

    def _on_closed(self, conn, reason) -> None:
        if not self.abandoned:
            self.abandoned = True
            self.batch.connection_lost(self, describe(reason))
        else:
            self.batch.session_gone(self)

    def _on_open(self, conn) -> None:
        if not self.abandoned:
            self.io = eagerio.install(conn)
            conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, ch) -> None:
        self.channel = ch
        ch.add_on_close_callback(self._on_channel_closed)
        ch.add_on_return_callback(self._on_return)
        ch.confirm_delivery(self._on_confirm, callback=lambda _: self._declare())

    def _on_channel_closed(self, ch, reason) -> None:
        # A channel that goes down with its connection is the connection's loss,
        # reported (and failed over) by _on_closed.
        if not self.abandoned and isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            self.batch.channel_closed(self, reason)

    def _declare(self) -> None:
        q = self.batch.declare
        if q is None:
            self._subscribe_replies()
        elif not q.declare:
            # Someone else's queue: check that it is there, as the daemon does.
            self.channel.queue_declare(q.name, passive=True,
                                       callback=lambda _: self._subscribe_replies())
        else:
            self.channel.queue_declare(q.name, durable=True,
                                       arguments=declarations(q)[0].arguments,
                                       callback=lambda _: self._subscribe_replies())

    def _subscribe_replies(self) -> None:
        if self.batch.wait:
            self.channel.basic_consume(REPLY_TO, self._on_reply, auto_ack=True,
                                       callback=lambda _: self._on_ready())
        else:
            self._on_ready()

    def _on_ready(self) -> None:
        if not self.abandoned:
            self.ready = True
            self.batch.session_ready(self)

    def _on_confirm(self, frame) -> None:
        if self.abandoned:
            return
        m = frame.method
        pending, tag = self.pending, m.delivery_tag
        if m.multiple:
            # Every tag from the lowest not yet settled by a multiple confirm up to this
            # one: each tag is looked at once over the whole batch, never the whole window.
            pop = pending.pop
            indexes = [i for i in (pop(t, None) for t in range(self.low, tag + 1))
                       if i is not None]
            self.low = max(self.low, tag + 1)
        else:
            i = pending.pop(tag, None)
            indexes = [] if i is None else [i]
        self.batch.confirmed_now(indexes, isinstance(m, pika.spec.Basic.Nack))

    def _on_return(self, ch, method, props, body) -> None:
        # A Basic.Return always precedes the confirm of the same message.
        self.batch.returned.add(props.message_id)

    def _on_reply(self, ch, method, props, body) -> None:
        if not self.abandoned:
            self.batch.reply(body)

    def _on_blocked(self, conn, frame) -> None:
        if not self.abandoned:
            self.blocked = True
            self.batch.blocked(self, getattr(frame.method, "reason", "") or "resource alarm")

    def _on_unblocked(self, conn, frame) -> None:
        if not self.abandoned:
            self.blocked = False
            self.batch.unblocked(self)


class Batch:
    """Publishes ``tasks`` over the first node that answers and fails over to the next
    when a connection is lost, re-publishing what was not confirmed yet. ``run`` returns
    when every task is settled or the batch gave up; the result is in its attributes."""

    def __init__(self, nodes: list[Node], queue: str, tasks: list[Outgoing], *,
                 declare: config_mod.Queue | None = None, headers: dict | None = None,
                 priority: int | None = None, due: float | None = None,
                 expires_ms: int | None = None, wait: bool = False,
                 wait_timeout: float | None = None, confirm_timeout: float = CONFIRM_TIMEOUT,
                 hooks: BatchHooks | None = None):
        self.nodes = list(nodes)
        self.queue = queue
        self.declare = declare
        self.tasks = list(tasks)   # the ids made as tasks are first published go in here
        # Ids the caller chose carry no publish time: their messages need the header.
        self.chosen_ids = any(t.message_id for t in tasks)
        self.headers = headers or None
        self.priority = priority
        self.due = due                  # epoch seconds: held back in the delay levels
        self.expires_ms = expires_ms    # epoch ms: not run when delivered later
        self.wait = wait
        self.timeout = wait_timeout
        self.confirm_timeout = confirm_timeout
        self.hooks = hooks or BatchHooks()
        self.ioloop = IOLoop()
        self.next = 0                   # the next never-published task index
        self.again: collections.deque = collections.deque()  # indexes to publish again first
        self.confirmed: set[int] = set()
        self.failed: dict[int, str] = {}    # task index -> why
        self.returned: set[str] = set()     # message ids returned as unroutable
        self.outcomes: dict[str, dict] = {}
        self.outcome_lost: set[int] = set()  # confirmed, but the reply went with a connection
        self.error: tuple[str, str] | None = None  # (why kind, message) if the batch gave up
        self.timed_out = False
        self.session: _Session | None = None
        self.candidates = list(self.nodes)  # nodes to try, in order, before giving up
        self.connect_errors: list[str] = []
        self.losses = 0
        self.published = 0    # basic.publish calls, over all connections
        self.republished = 0  # published again after a lost connection: may arrive twice
        # Each node may be lost twice; a batch that keeps losing them gives up.
        self.max_losses = 2 * len(self.nodes)
        self.progress_at = time.monotonic()  # last open, confirm or unblock
        self.blocked_at: float | None = None
        self.finishing = False

    # --- the run ---------------------------------------------------------

    def run(self) -> "Batch":
        self.ioloop.call_later(1, self._tick)
        if self.timeout is not None and self.wait:
            self.ioloop.call_later(self.timeout, self._on_wait_timeout)
        self._connect_next()
        try:
            self.ioloop.start()
        except KeyboardInterrupt:
            self.error = self.error or (INTERRUPTED, "interrupted")
        finally:
            try:
                self.ioloop.close()
            except Exception:   # noqa: BLE001 - a loop that cannot close holds nothing of ours
                pass
        return self

    def _connect_next(self) -> None:
        if not self.candidates:
            self._give_up(UNREACHABLE, "cannot connect to " + "; ".join(self.connect_errors))
            return
        node = self.candidates.pop(0)
        self.progress_at = time.monotonic()
        self.session = _Session(self, node)

    def connect_failed(self, s: _Session, error) -> None:
        self.connect_errors.append(f"{s.node.label}: {describe(error)}")
        if isinstance(error, (pika.exceptions.ProbableAuthenticationError,
                              pika.exceptions.ProbableAccessDeniedError)):
            # The users of a cluster are the same on every node: no point in going on.
            self._give_up(UNREACHABLE, f"cannot connect to {s.node.label}: {describe(error)}")
        else:
            self._connect_next()  # a refused or silent node: the next one

    def session_ready(self, s: _Session) -> None:
        self.connect_errors = []
        self.candidates = []
        self.progress_at = time.monotonic()
        self._publish_more()

    def connection_lost(self, s: _Session, why: str) -> None:
        """The connection closed under us (or was given up): fail over, or finish."""
        if self.finishing:
            self.ioloop.stop()
            return
        lost = sorted(s.pending.values())
        s.pending.clear()
        self.republished += len(lost)
        self.again.extendleft(reversed(lost))
        if self.wait:
            # Direct reply-to answers only the connection that asked.
            self.outcome_lost |= {i for i in self.confirmed
                                  if self.tasks[i].message_id not in self.outcomes}
        if self._done():
            self._finish()
            return
        self.losses += 1
        if self.losses > self.max_losses:
            self._give_up(NOT_CONFIRMED, f"connection to {s.node.label} lost: {why}; giving "
                          f"up after {self.losses - 1} reconnect(s)")
            return
        if s.ready:
            self.hooks.failover(s.node.label, why, self._todo(), len(lost))
        # The other nodes in order, the one just lost last.
        i = self.nodes.index(s.node)
        self.candidates = self.nodes[i + 1:] + self.nodes[:i] + [s.node]
        self.connect_errors = [f"{s.node.label}: {why}"]
        self._connect_next()

    def session_gone(self, s: _Session) -> None:
        if self.finishing and s is self.session:
            self.ioloop.stop()

    def channel_closed(self, s: _Session, reason) -> None:
        code = getattr(reason, "reply_code", 0)
        if code == 406 and self.declare is not None:
            self._give_up(MISMATCH, f"queue {self.queue} exists with other arguments than "
                          f"the config declares: {reason.reply_text}")
        elif not self._done():
            self._give_up(NOT_CONFIRMED, f"channel closed: {describe(reason)}")

    def blocked(self, s: _Session, reason: str) -> None:
        self.blocked_at = time.monotonic()
        self.hooks.blocked(s.node.label, reason, self.confirm_timeout)

    def unblocked(self, s: _Session) -> None:
        self.blocked_at = None
        self.progress_at = time.monotonic()
        self.hooks.unblocked(s.node.label)
        self._publish_more()

    def _tick(self) -> None:
        """Once a second: the deadlines no broker callback will enforce for us."""
        if self.finishing:
            return
        self.ioloop.call_later(1, self._tick)
        self.hooks.tick(len(self.confirmed), len(self.tasks))
        s, now = self.session, time.monotonic()
        if s is None or s.abandoned:
            return
        if s.blocked and self.blocked_at is not None:
            if now - self.blocked_at > self.confirm_timeout:
                self._give_up(NOT_CONFIRMED if self.confirmed else UNREACHABLE,
                              f"gave up after {self.confirm_timeout:g}s: the broker at "
                              f"{s.node.label} is still blocking publishers (alarm)")
        elif (s.pending or not s.ready) and s.conn.is_open \
                and now - self.progress_at > self.confirm_timeout:
            # Open but silent: a hung node. Heartbeats would take longer to notice.
            s.abandon()
            self.connection_lost(s, f"no answer for {self.confirm_timeout:g}s")

    # --- publishing ------------------------------------------------------

    def _todo(self) -> int:
        return len(self.again) + len(self.tasks) - self.next

    def _publish_more(self) -> None:
        s = self.session
        if s is None or not s.ready or s.blocked or self.finishing:
            return
        room = WINDOW - len(s.pending)
        again = self.again
        while again and room > 0:
            self._publish(s, [again.popleft()])
            room -= 1
        if room > 0 and self.next < len(self.tasks):
            end = min(len(self.tasks), self.next + room)
            self._publish(s, range(self.next, end))
            self.next = end
        self._maybe_finish()

    def _publish(self, s: _Session, indexes) -> None:
        """basic.publish each task; the properties shared by the whole burst are built
        once (the per-task cost is the publish itself)."""
        tasks, pending, queue = self.tasks, s.pending, self.queue
        publish = s.channel.basic_publish
        now = time.time()
        # Millisecond publish time for workqd_task_queue_wait_seconds (the timestamp
        # property has whole seconds only): in the id made now, else in a header.
        unnamed = [i for i in indexes if not tasks[i].message_id]
        for i, mid in zip(unnamed, new_message_ids(len(unnamed), int(now * 1000))):
            tasks[i] = Outgoing(mid, tasks[i].body, tasks[i].line)
        headers = dict(self.headers or {})
        if self.chosen_ids:
            headers[vocab.H_SUBMITTED_MS] = int(now * 1000)
        if self.expires_ms is not None:
            headers[vocab.H_EXPIRES_MS] = self.expires_ms
        exchange, routing_key = "", queue
        if self.due is not None and self.due - now >= 0.5:
            exchange, routing_key, headers = delays.routed(queue, headers, self.due - now,
                                                           int(self.due * 1000))
        burst = _Burst(pika.BasicProperties(
            delivery_mode=2, headers=headers or None, priority=self.priority, timestamp=int(now),
            reply_to=REPLY_TO if self.wait else None, content_type="text/plain"))
        props_of = burst.of
        seq, n = s.seq, 0
        with s.io.corked():   # a few large sends for the burst, not three per task
            for i in indexes:
                mid, body, _ = tasks[i]
                publish(exchange, routing_key, body, props_of(mid), mandatory=True)
                seq += 1
                pending[seq] = i
                n += 1
        s.seq = seq
        self.published += n

    def confirmed_now(self, indexes: list[int], nack: bool) -> None:
        self.progress_at = time.monotonic()
        if nack:
            for i in indexes:
                self.failed[i] = "nacked by the broker"
        elif self.returned or self.failed:
            for i in indexes:
                if self.tasks[i].message_id in self.returned:
                    self.failed[i] = f"unroutable: no queue named {self.queue}"
                else:
                    self.failed.pop(i, None)
                    self.confirmed.add(i)
        else:
            self.confirmed.update(indexes)
        self.hooks.progress(len(self.confirmed), len(self.tasks))
        s = self.session
        if self._todo() and s is not None and len(s.pending) < WINDOW // 2:
            self._publish_more()
        else:
            self._maybe_finish()

    def reply(self, body: bytes) -> None:
        try:
            reply = json.loads(body)
        except ValueError:
            return
        if not isinstance(reply, dict):
            return
        if reply.get("outcome") not in FINAL_OUTCOMES and not reply.get("final"):
            self.hooks.outcome(reply, False)
            return
        mid = reply.get("message_id")
        if mid in self.outcomes:
            return
        self.outcomes[mid] = reply
        self.hooks.outcome(reply, True)
        self._maybe_finish()

    def _on_wait_timeout(self) -> None:
        if not self._done() and not self.finishing:
            self.timed_out = True
            self._give_up(WAIT_TIMEOUT, f"--timeout {self.timeout:g}s passed with "
                          f"{len(self.tasks) - len(self.outcomes)} outcome(s) missing")

    def _done(self) -> bool:
        if self._todo() or (self.session is not None and self.session.pending):
            return False
        if self.wait:
            waiting = {self.tasks[i].message_id for i in self.confirmed - self.outcome_lost}
            return waiting <= set(self.outcomes)
        return True

    def _maybe_finish(self) -> None:
        if self._done():
            self._finish()

    def _give_up(self, kind: str, message: str) -> None:
        self.error = self.error or (kind, message)
        self._finish()

    def _finish(self) -> None:
        """Close the connection if it can still answer, and leave the loop (bounded)."""
        if self.finishing:
            return
        self.finishing = True
        self.hooks.finished()
        s = self.session
        if s is not None and s.conn.is_open and not s.blocked and not s.abandoned:
            s.abandoned = True
            try:
                s.conn.close()
            except pika.exceptions.AMQPError:
                self.ioloop.stop()
                return
            self.ioloop.call_later(CLOSE_TIMEOUT, self.ioloop.stop)
        else:
            self.ioloop.stop()

    # --- the result ------------------------------------------------------

    def unconfirmed(self) -> list[int]:
        return [i for i in range(len(self.tasks)) if i not in self.confirmed
                and i not in self.failed]


def describe(error) -> str:
    """A pika error in one line, naming a connect timeout as such."""
    return amqperrors.describe(error, CONNECT_TIMEOUT)
