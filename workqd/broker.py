"""What every AMQP client in workqd agrees on: connection parameters, queue shapes, failover.

The worker, the master's depth poller and workq-submit all declare queues through
``queue_arguments`` so that a queue is never declared two ways (RabbitMQ refuses
a redeclaration with other arguments, PRECONDITION_FAILED).
"""

from __future__ import annotations

import logging
import re
import ssl
import urllib.parse
from typing import NamedTuple

import pika

from . import delays, vocab
from .config import Broker, Invalid, Queue, read_password, redact  # noqa: F401 (redact: re-exported)

log = logging.getLogger("workqd.broker")

RECONNECT_FIRST = 0.25   # seconds before the first retry of one URL; doubles per failure
RECONNECT_MAX = 15.0     # cap of the reconnect backoff


def queue_arguments(queue: Queue) -> dict:
    # The operator's own (x-max-length, x-max-priority ...) first: config.py refuses
    # every argument workqd sets below, so none is overridden.
    args = dict(queue.arguments)
    args["x-queue-type"] = queue.type
    if queue.type == "quorum":
        args.update(_quorum_dead_lettering(queue, vocab.dead_letter_queue(queue.name)))
        # RabbitMQ 4 gives quorum queues a delivery limit of 20 and drops a message
        # past it unless the queue dead-letters: set the limit workqd's own poison
        # check uses, so the broker's is a backstop that lands in <queue>.dead too.
        args["x-delivery-limit"] = queue.max_redeliveries
    return args


def legacy_queue_arguments(queue: Queue) -> dict:
    """What workqd before 0.2 declared; accepted with a warning (see Session._declare)."""
    return {**dict(queue.arguments), "x-queue-type": queue.type}


def dead_letter_arguments(queue: Queue) -> dict:
    # The dead-letter queue has the same type as its work queue, so a quorum
    # setup keeps its replication guarantees for the tasks operators must look at.
    return {"x-queue-type": queue.type}


def _quorum_dead_lettering(queue: Queue, target: str) -> dict:
    # At-least-once dead-lettering (RabbitMQ >= 3.10) keeps a message on its
    # queue until the target confirmed it; it requires reject-publish overflow.
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": target,
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


class Declaration(NamedTuple):
    name: str
    arguments: dict
    legacy: dict | None   # accepted instead, with a warning, from a queue an older workqd made
    fix: str              # what the warning tells the operator to do
    passive: bool = False  # only check that it exists (declare: false), as it is


def declarations(queue: Queue) -> list:
    """Every queue a worker declares, work queue first; with side queues, its dead-letter
    queue, the vhost's delay levels (delays.py: exchanges, queues and their bindings,
    idempotent) and the queue's delivery binding; then its configured bindings: each
    exchange checked passively (workqd never creates or changes those) and the queue
    bound."""
    name = queue.name
    if not queue.declare:
        out = [Declaration(name, {}, None, "", passive=True)]
    else:
        out = _work_queue(queue)
    if queue.declare_side_queues:
        out += _side_queues(queue)
    return out + list(queue.bindings)


def _work_queue(queue: Queue) -> list[Declaration]:
    name = queue.name
    policy = (f"rabbitmqctl set_policy workqd-{name} '^{re.escape(name)}$' "
              f"'{{\"dead-letter-exchange\":\"\",\"dead-letter-routing-key\":"
              f"\"{vocab.dead_letter_queue(name)}\",\"delivery-limit\":{queue.max_redeliveries}}}' "
              f"--apply-to quorum_queues")
    return [Declaration(name, queue_arguments(queue),
                        legacy_queue_arguments(queue) if queue.type == "quorum" else None,
                        f"give it a dead-letter target with: {policy}")]


def _side_queues(queue: Queue) -> list:
    # Retries and deferrals wait in the shared delay levels, whatever their delay: no
    # queue per delay. The per-queue delay queues of earlier versions are no longer
    # declared; what they hold still dead-letters into the work queue (workqd.8,
    # "Upgrading", removes them once empty).
    exchanges, levels, binds = delays.topology()
    return [Declaration(vocab.dead_letter_queue(queue.name), dead_letter_arguments(queue),
                        None, ""),
            *exchanges, *levels, *binds, delays.stray_delivery_binding(queue.name),
            delays.delivery_binding(queue.name)]


class Failover:
    """The reconnect policy every workqd client shares: which URL next, and after how long.

    A failed node goes to the end of the list (a hung node would otherwise eat a
    whole connect timeout on every attempt); while other nodes are untried the
    next attempt is immediate, after that the delay doubles up to RECONNECT_MAX.
    """

    def __init__(self, urls, start: int = 0):
        self._urls = list(urls)
        if len(self._urls) > 1:
            k = start % len(self._urls)
            self._urls = self._urls[k:] + self._urls[:k]
        self._failures = 0

    @property
    def current(self) -> str:
        return self._urls[0]

    def failed(self) -> float:
        """The current URL failed: rotate, and return the seconds to wait before the next try."""
        self._failures += 1
        n = len(self._urls)
        if n > 1:
            self._urls.append(self._urls.pop(0))
            if self._failures < n:
                return 0.0
        return min(RECONNECT_MAX, RECONNECT_FIRST * 2 ** min(self._failures - n, 8))

    def succeeded(self) -> None:
        self._failures = 0


def connection_parameters(broker: Broker, url: str, name: str,
                          heartbeat: int | None = None) -> pika.ConnectionParameters:
    """Parameters for one broker URL; the password_file and TLS options override the URL."""
    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.unquote(parts.username) if parts.username else "guest"
    password = _current_password(broker)
    if password is None:
        password = urllib.parse.unquote(parts.password) if parts.password is not None else "guest"
    # pika 1.2.0 cannot parse a URL with a user but no password, so the
    # credentials never go through URLParameters.
    params = pika.URLParameters(urllib.parse.urlunsplit(
        parts._replace(netloc=parts.netloc.rpartition("@")[2])))
    params.credentials = pika.PlainCredentials(user, password)
    params.heartbeat = broker.heartbeat if heartbeat is None else heartbeat
    # One attempt per URL: retry policy lives in the callers, with backoff and failover.
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.stack_timeout = 10
    params.blocked_connection_timeout = 60
    params.client_properties = {"connection_name": name, "product": "workqd"}
    if urllib.parse.urlsplit(url).scheme == "amqps":
        ctx = ssl.create_default_context(cafile=broker.tls.ca_file)
        if broker.tls.cert_file:
            # A passphrase callback that gives none: OpenSSL must never prompt.
            ctx.load_cert_chain(broker.tls.cert_file, broker.tls.key_file, password=lambda: b"")
        params.ssl_options = pika.SSLOptions(ctx, params.host)
    return params


def _current_password(broker: Broker) -> str | None:
    """The password file as it is now (a rotated secret applies at the next connect); the
    one read at start when the file cannot be read any more."""
    if broker.password_file:
        try:
            return read_password(broker.password_file)
        except Invalid as e:
            log.warning("broker.password_file: %s; using the password read at start", e)
    return broker.password
