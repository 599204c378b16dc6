"""What every AMQP client in workqd agrees on: connection parameters and queue shapes.

The worker, the master's depth poller and workq-submit all declare queues through
``queue_arguments`` so that a queue is never declared two ways (RabbitMQ refuses
a redeclaration with other arguments, PRECONDITION_FAILED).
"""

from __future__ import annotations

import ssl
import urllib.parse

import pika

from .config import Broker, Queue

# Headers workqd writes on messages it republishes; documented in workqd.yaml(5).
H_ATTEMPT = "x-workq-attempt"        # try number the message is for (1 = first)
H_REASON = "x-workq-reason"          # failed | timeout | poison | too-large
H_ERROR = "x-workq-error"            # last error line of the handler
H_DEAD_AT = "x-workq-dead-at"        # UTC time of dead-lettering, ISO 8601
H_QUEUE = "x-workq-queue"            # queue the task was consumed from


def queue_arguments(queue: Queue) -> dict:
    return {"x-queue-type": queue.type}


def dead_letter_arguments(queue: Queue) -> dict:
    # The dead-letter queue has the same type as its work queue, so a quorum
    # setup keeps its replication guarantees for the tasks operators must look at.
    return {"x-queue-type": queue.type}


def delay_queue_name(queue: Queue, delay: float) -> str:
    return f"{queue.name}.delay.{delay:g}s"


def delay_queue_arguments(queue: Queue, delay: float) -> dict:
    # A message waits out the TTL, then the broker dead-letters it back to the
    # work queue through the default exchange. Classic, because TTL expiry from
    # the head is exact there; the delay queue only ever holds copies that are
    # already confirmed.
    return {
        "x-queue-type": "classic",
        "x-message-ttl": int(delay * 1000),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue.name,
    }


def connection_parameters(broker: Broker, url: str, name: str,
                          heartbeat: int | None = None) -> pika.ConnectionParameters:
    """Parameters for one broker URL; the password_file and TLS options override the URL."""
    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.unquote(parts.username) if parts.username else "guest"
    password = broker.password
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
            ctx.load_cert_chain(broker.tls.cert_file, broker.tls.key_file)
        params.ssl_options = pika.SSLOptions(ctx, params.host)
    return params


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
