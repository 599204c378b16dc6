"""``workq-submit``: publish tasks safely — persistent, confirmed, mandatory.

Confirms are pipelined: up to WINDOW messages are in flight at once and each
confirm frees room for more, so a file of 20,000 lines costs a few round trips,
not 20,000. Every task that the broker did not confirm, or returned as
unroutable, is named on stderr and the exit status says so.

Every argument is checked before the first connection (exit 2, one line). The
nodes of a cluster are tried in order; when a connection is lost mid-batch, the
tasks still waiting for their confirm are published again on the next node
(at-least-once: they may arrive twice, with the same message id). Every wait has
a deadline: a node gets CONNECT_TIMEOUT to answer, a connection that confirms
nothing for --confirm-timeout seconds is given up, and so is a broker that keeps
blocking publishers (a memory or disk alarm) for that long.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import ssl
import stat
import sys
import time
import urllib.parse
import uuid
from typing import Callable

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from . import amqperrors, delays, exitcodes, vocab, when
from . import config as config_mod
from .broker import connection_parameters, declarations, queue_arguments, redact
from .progress import Progress

WINDOW = 5000          # unconfirmed messages in flight at most
REPLY_TO = "amq.rabbitmq.reply-to"
FINAL_OUTCOMES = {"success", "dead_letter"}

LINE_MAX = 16 * 1024 * 1024    # one task; RabbitMQ 4.0's default max_message_size, workqd's max_body
FILE_MAX = 256 * 1024 * 1024   # one --file; bigger batches are split (split -C 200M)
TASKS_MAX = 1_000_000          # tasks in one run; each is held in memory until confirmed
CONFIG_MAX = 16 * 1024 * 1024  # a -c file (only to refuse /dev/zero before reading it)
SECONDS_MAX = 7 * 24 * 3600    # the longest --timeout / --confirm-timeout
CONNECT_TIMEOUT = 10.0         # per node: TCP, TLS and AMQP handshake (pika's stack_timeout)
CLOSE_TIMEOUT = 5.0            # a clean close may take this long, then we just leave
DEFAULT_CONFIRM_TIMEOUT = 30.0
SHORTSTR = 255                 # AMQP limit for queue names, header keys, message ids (bytes)
PASSWORD_ENV = "WORKQ_PASSWORD"


class UsageError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """One task as workq-submit publishes it (the handler side's view is workqd.task.Task)."""
    message_id: str
    body: bytes
    line: int | None = None   # line number in --file, for the operator who re-submits

    def name(self) -> str:
        return self.message_id if self.line is None else f"{self.message_id} (line {self.line})"


@dataclasses.dataclass(frozen=True)
class Node:
    label: str                        # the URL without its password
    params: pika.ConnectionParameters


# --- arguments -----------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, like every other refusal (argparse would add the usage block).
        self.exit(exitcodes.SUBMIT_USAGE, f"workq-submit: {message} (see --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(
        prog="workq-submit",
        description="Publish tasks to a workqd queue with publisher confirms. WORDS are joined "
        "with spaces into one task; --file publishes one task per line.")
    p.add_argument("-c", "--config", help="workqd config: its broker, and its queue declared "
                   "exactly as the daemon declares it")
    p.add_argument("--url", action="append", default=[],
                   help="broker URL; repeat it for the nodes of a cluster, tried in order "
                   # argparse %-formats help strings: the URL's %2F must be written %%2F.
                   f"(default: the config's broker.urls, else "
                   f"{config_mod.DEFAULT_URL.replace('%', '%%')})")
    p.add_argument("--password-file", metavar="PATH",
                   help=f"read the broker password from PATH (overrides ${PASSWORD_ENV}, the "
                   "config's and the URL's)")
    p.add_argument("-q", "--queue", help="queue (default: the config's first queue, else tasks)")
    p.add_argument("--header", action="append", default=[], metavar="K=V",
                   help="message header; may be repeated")
    p.add_argument("--priority", type=int, help="message priority 0-255")
    p.add_argument("--message-id", help="message id (default: a random one per task); one task only")
    p.add_argument("--file", metavar="PATH|-", help="publish one task per non-empty line of PATH "
                   "(- for standard input)")
    p.add_argument("--wait", action="store_true",
                   help="wait for each task's outcome and print one line per task")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    p.add_argument("--confirm-timeout", type=float, metavar="S",
                   help="give up on a broker that confirms nothing, or blocks publishers "
                   f"(alarm), for S seconds (default {DEFAULT_CONFIRM_TIMEOUT:g})")
    p.add_argument("--delay", metavar="DURATION",
                   help="hold the task back this long: 90, 90s, 15m, 2h, 3d (up to 100 years)")
    p.add_argument("--at", metavar="TIME",
                   help="hold the task back until TIME, ISO 8601 with its offset "
                   "(2026-12-24T03:00:00+01:00)")
    p.add_argument("--expires", metavar="DURATION|TIME",
                   help="a task delivered later than this is not run (dead-lettered as expired)")
    p.add_argument("--requeue-dead", metavar="QUEUE",
                   help="move every task in QUEUE.dead back to QUEUE (after fixing the cause), "
                   "as a first try again; nothing else is published")
    p.add_argument("words", nargs="*", metavar="WORDS")
    return p.parse_args(argv)


def seconds(option: str, value: float) -> float:
    if not math.isfinite(value) or not 0 < value <= SECONDS_MAX:
        raise UsageError(f"{option} {value:g}: must be a number of seconds above 0 "
                         f"and at most {SECONDS_MAX}")
    return value


def utf8(option: str, value: str, max_bytes: int | None = SHORTSTR) -> str:
    """``value`` if the broker can take it as an AMQP string; ``max_bytes`` for a shortstr."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise UsageError(f"{option}: not valid UTF-8") from None
    if max_bytes is not None and size > max_bytes:
        raise UsageError(f"{option}: longer than {max_bytes} bytes")
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise UsageError(f"{option} {value!r}: contains a control character")
    return value


def queue_name(option: str, value: str) -> str:
    if not value:
        raise UsageError(f"{option}: empty queue name")
    return utf8(f"{option} {value}", value)


def parse_headers(items: list[str]) -> dict:
    headers = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--header {item!r}: must be KEY=VALUE")
        headers[utf8(f"--header {key!r}", key)] = utf8(f"--header {key!r}", value, None)
    return headers


def read_regular(path: str, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; FIFOs, devices and
    directories are refused before a read could block or never end."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {path}: not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > limit:
            raise UsageError(f"{what} {path}: larger than {_size(limit)}")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while we read it
        raise UsageError(f"{what} {path}: larger than {_size(limit)}")
    return data


def read_stream(stream, what: str) -> bytes:
    """Standard input, up to FILE_MAX, refusing a line longer than LINE_MAX as soon as
    it is seen (``< /dev/zero`` ends in a second, not when memory runs out)."""
    chunks, total, line_run = [], 0, 0
    while True:
        try:
            chunk = stream.read1(1 << 20)
        except OSError as e:
            raise UsageError(f"{what}: {e.strerror}") from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > FILE_MAX:
            raise UsageError(f"{what}: more than {_size(FILE_MAX)}")
        nl = chunk.rfind(b"\n")
        line_run = line_run + len(chunk) if nl < 0 else len(chunk) - nl - 1
        if line_run > LINE_MAX:
            raise UsageError(f"{what}: a line longer than {_size(LINE_MAX)}")
        chunks.append(chunk)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a file"


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n >= 1024 * 1024 else f"{n // 1024} KiB"


def build_tasks(args: argparse.Namespace) -> list[Outgoing]:
    """Every task the arguments describe, each with its message id."""
    if args.words == ["-"] and not args.file:
        args.file, args.words = "-", []  # a lone "-" reads tasks from stdin, like --file -
    if args.file is not None and args.words:
        raise UsageError("give WORDS or --file, not both")
    if args.file is not None:
        if args.file == "":
            raise UsageError("--file '': empty path")
        if args.file == "-":
            if sys.stdin is None:
                raise UsageError("--file -: standard input is closed")
            data = read_stream(sys.stdin.buffer, "standard input")
        else:
            data = read_regular(args.file, FILE_MAX, "--file")
        name = "standard input" if args.file == "-" else args.file
        bodies: list[tuple[bytes, int | None]] = []
        for n, line in enumerate(data.split(b"\n"), 1):
            if len(line) > LINE_MAX:
                raise UsageError(f"{name}: line {n} is longer than {_size(LINE_MAX)}")
            if line.strip():
                bodies.append((line, n))
                if len(bodies) > TASKS_MAX:
                    raise UsageError(f"{name}: more than {TASKS_MAX} tasks; split the file")
        if not bodies:
            raise UsageError(f"{name}: no tasks (no non-empty lines)")
    elif args.words:
        # Bytes as given: surrogateescape keeps a non-UTF-8 argument's bytes.
        body = b" ".join(os.fsencode(w) for w in args.words)
        if not body.strip():
            raise UsageError("empty task: WORDS are all blank")
        if len(body) > LINE_MAX:
            raise UsageError(f"the task is longer than {_size(LINE_MAX)}")
        bodies = [(body, None)]
    else:
        bodies = [(b"Hello World!", None)]  # as in the RabbitMQ tutorial's new_task.py
    if args.message_id is not None:
        if len(bodies) != 1:
            raise UsageError(f"--message-id needs exactly one task, got {len(bodies)}")
        if not args.message_id:
            raise UsageError("--message-id '': empty id")
        mid = utf8("--message-id", args.message_id)
        return [Outgoing(mid, bodies[0][0], bodies[0][1])]
    return [Outgoing(uuid.uuid4().hex, body, line) for body, line in bodies]


def safe_redact(url: str) -> str:
    """``redact`` for any string, also one that urlsplit cannot parse."""
    try:
        return redact(url)
    except ValueError:
        return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def check_url(url: str) -> str:
    """``url`` if it names an amqp(s) broker with a host and a usable port."""
    if not url:
        raise UsageError("--url '': empty URL")
    shown = safe_redact(url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UsageError(f"broker URL {shown}: {e}") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise UsageError(f"broker URL {shown}: must start with amqp:// or amqps://")
    if not parts.hostname:
        raise UsageError(f"broker URL {shown}: no host")
    if port == 0:
        raise UsageError(f"broker URL {shown}: port 0")
    return url


def password_override(args: argparse.Namespace) -> str | None:
    """The password from --password-file, else from $WORKQ_PASSWORD, else None."""
    if args.password_file is not None:
        # The daemon's own reader (broker.password_file): the same checks, the same words.
        try:
            return config_mod.read_password(args.password_file)
        except config_mod.Invalid as e:
            raise UsageError(f"--password-file: {e}") from None
    password = os.environ.get(PASSWORD_ENV)
    if password:  # set but empty counts as unset
        try:
            password.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"${PASSWORD_ENV}: not valid UTF-8") from None
        return password
    return None


def load_config(path: str) -> config_mod.Config:
    read_regular(path, CONFIG_MAX, "-c")  # refuses FIFOs and devices before load() reads
    try:
        return config_mod.load(path)
    except config_mod.ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any file must end in one line, not a traceback
        raise UsageError(f"{path}: cannot be used: {type(e).__name__}: {e}") from None


def check_tls_files(broker: config_mod.Broker, source: str) -> None:
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(broker.tls, key)
        if path:
            read_regular(path, CONFIG_MAX, f"{source}: broker.tls.{key}")


def nodes_for(urls: list[str], broker: config_mod.Broker, source: str,
              confirm_timeout: float) -> list[Node]:
    """Connection parameters for every URL, built now so that a bad URL or TLS file is
    a usage error (exit 2) before anything is published."""
    if any(urllib.parse.urlsplit(u).scheme == "amqps" for u in urls):
        check_tls_files(broker, source)
    nodes = []
    for url in urls:
        shown = safe_redact(url)
        parts = urllib.parse.urlsplit(url)
        if parts.username and parts.password is None and broker.password is None:
            raise UsageError(f"broker URL {shown} names user {parts.username!r} but no password: "
                             f"use --password-file or ${PASSWORD_ENV}")
        try:
            params = connection_parameters(broker, url, "workq-submit")
        except ssl.SSLError as e:  # a CA, certificate or key file that is not PEM
            raise UsageError(f"{source}: broker.tls: cannot load the TLS files: "
                             f"{e.reason or e}") from None
        except Exception as e:  # noqa: BLE001 - pika's URL and ssl errors have no common base
            raise UsageError(f"cannot use broker URL {shown}: {_describe(e)}") from None
        params.stack_timeout = CONNECT_TIMEOUT
        # pika's own backstop; our timer gives up first, with a clearer line.
        params.blocked_connection_timeout = confirm_timeout + CLOSE_TIMEOUT
        nodes.append(Node(shown, params))
    return nodes


# --- publishing ----------------------------------------------------------

class _Session:
    """One connection and its channel. Confirm tags, the blocked state and the reply
    consumer live and die here; the Submitter decides what happens next."""

    def __init__(self, sub: "Submitter", node: Node):
        self.sub = sub
        self.node = node
        self.channel = None
        self.ready = False         # channel open, confirms on, queue declared
        self.abandoned = False     # given up on: every later callback is ignored
        self.blocked = False
        self.seq = 0               # publish sequence on the channel (= confirm tag)
        self.pending: dict[int, int] = {}   # confirm tag -> task index
        self.conn = pika.SelectConnection(node.params, on_open_callback=self._on_open,
                                          on_open_error_callback=self._on_open_error,
                                          on_close_callback=self._on_closed,
                                          custom_ioloop=sub.ioloop)
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
            self.sub.connect_failed(self, error)

    def _on_closed(self, conn, reason) -> None:
        if not self.abandoned:
            self.abandoned = True
            self.sub.connection_lost(self, _describe(reason))
        else:
            self.sub.session_gone(self)

    def _on_open(self, conn) -> None:
        if not self.abandoned:
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
            self.sub.channel_closed(self, reason)

    def _declare(self) -> None:
        q = self.sub.declare
        if q is None:
            self._subscribe_replies()
        elif not q.declare:
            # Someone else's queue: check that it is there, as the daemon does.
            self.channel.queue_declare(q.name, passive=True,
                                       callback=lambda _: self._subscribe_replies())
        else:
            self.channel.queue_declare(q.name, durable=True, arguments=declarations(q)[0].arguments,
                                       callback=lambda _: self._subscribe_replies())

    def _subscribe_replies(self) -> None:
        if self.sub.wait:
            self.channel.basic_consume(REPLY_TO, self._on_reply, auto_ack=True,
                                       callback=lambda _: self._on_ready())
        else:
            self._on_ready()

    def _on_ready(self) -> None:
        if not self.abandoned:
            self.ready = True
            self.sub.session_ready(self)

    def publish(self, i: int, task: Outgoing) -> None:
        sub = self.sub
        now = time.time()
        # Millisecond publish time for workqd_task_queue_wait_seconds (the
        # timestamp property has whole seconds only).
        headers = {**(sub.headers or {}), vocab.H_SUBMITTED_MS: int(now * 1000)}
        if sub.expires_ms is not None:
            headers[vocab.H_EXPIRES_MS] = sub.expires_ms
        exchange, routing_key = "", sub.queue
        if sub.due is not None and sub.due - now >= 0.5:
            exchange, routing_key, headers = delays.routed(sub.queue, headers, sub.due - now,
                                                           int(sub.due * 1000))
        props = pika.BasicProperties(
            delivery_mode=2, message_id=task.message_id, headers=headers,
            priority=sub.priority, timestamp=int(now),
            reply_to=REPLY_TO if sub.wait else None, content_type="text/plain")
        self.channel.basic_publish(exchange, routing_key, task.body, props, mandatory=True)
        self.seq += 1
        self.pending[self.seq] = i

    def _on_confirm(self, frame) -> None:
        if self.abandoned:
            return
        m = frame.method
        tags = [t for t in self.pending if t <= m.delivery_tag] if m.multiple else [m.delivery_tag]
        nack = isinstance(m, pika.spec.Basic.Nack)
        self.sub.confirmed_now([i for i in (self.pending.pop(t, None) for t in tags)
                                if i is not None], nack)

    def _on_return(self, ch, method, props, body) -> None:
        # A Basic.Return always precedes the confirm of the same message.
        self.sub.returned.add(props.message_id)

    def _on_reply(self, ch, method, props, body) -> None:
        if not self.abandoned:
            self.sub.reply(body)

    def _on_blocked(self, conn, frame) -> None:
        if not self.abandoned:
            self.blocked = True
            self.sub.blocked(self, getattr(frame.method, "reason", "") or "resource alarm")

    def _on_unblocked(self, conn, frame) -> None:
        if not self.abandoned:
            self.blocked = False
            self.sub.unblocked(self)


class Submitter:
    """Publishes ``tasks`` over the first node that answers and fails over to the next
    when a connection is lost, re-publishing what was not confirmed yet."""

    def __init__(self, nodes: list[Node], queue: str, declare: config_mod.Queue | None,
                 tasks: list[Outgoing], headers: dict, priority: int | None,
                 wait: bool, timeout: float | None, confirm_timeout: float):
        self.nodes = list(nodes)
        self.queue = queue
        self.declare = declare
        self.tasks = tasks
        self.headers = headers or None
        self.priority = priority
        self.wait = wait
        self.timeout = timeout
        self.confirm_timeout = confirm_timeout
        self.ioloop = IOLoop()
        self.todo = collections.deque(range(len(tasks)))  # task indexes to publish, in order
        self.confirmed: set[int] = set()
        self.failed: dict[int, str] = {}    # task index -> why
        self.returned: set[str] = set()     # message ids returned as unroutable
        self.outcomes: dict[str, dict] = {}
        self.outcome_lost: set[int] = set()  # confirmed, but the reply went with a connection
        self.error: tuple[int, str] | None = None  # (exit status, message) if we gave up
        self.timed_out = False
        self.session: _Session | None = None
        self.candidates = list(self.nodes)  # nodes to try, in order, before giving up
        self.connect_errors: list[str] = []
        self.losses = 0
        self.published = 0    # basic.publish calls, over all connections
        self.republished = 0  # published again after a lost connection: may arrive twice
        self.due: float | None = None        # epoch seconds: held back in the delay levels
        self.expires_ms: int | None = None   # epoch ms: not run when delivered later
        # Each node may be lost twice; a batch that keeps losing them gives up.
        self.max_losses = 2 * len(self.nodes)
        self.progress_at = time.monotonic()  # last open, confirm or unblock
        self.blocked_at: float | None = None
        self.finishing = False
        # On a terminal, a long run shows how far it is (never with --wait, whose
        # outcome lines own the terminal).
        self.progress = Progress(0 if wait else len(tasks))

    # --- the run ---------------------------------------------------------

    def run(self) -> None:
        self.ioloop.call_later(1, self._tick)
        if self.timeout is not None and self.wait:
            self.ioloop.call_later(self.timeout, self._on_wait_timeout)
        self._connect_next()
        try:
            self.ioloop.start()
        except KeyboardInterrupt:
            self.error = self.error or (exitcodes.SUBMIT_NOT_CONFIRMED, "interrupted")

    def _connect_next(self) -> None:
        if not self.candidates:
            self._give_up(exitcodes.SUBMIT_UNREACHABLE,
                          "cannot connect to " + "; ".join(self.connect_errors))
            return
        node = self.candidates.pop(0)
        self.progress_at = time.monotonic()
        self.session = _Session(self, node)

    def connect_failed(self, s: _Session, error) -> None:
        self.connect_errors.append(f"{s.node.label}: {_describe(error)}")
        if isinstance(error, (pika.exceptions.ProbableAuthenticationError,
                              pika.exceptions.ProbableAccessDeniedError)):
            # The users of a cluster are the same on every node: no point in going on.
            self._give_up(exitcodes.SUBMIT_UNREACHABLE,
                          f"cannot connect to {s.node.label}: {_describe(error)}")
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
        self.todo.extendleft(reversed(lost))
        if self.wait:
            # Direct reply-to answers only the connection that asked.
            self.outcome_lost |= {i for i in self.confirmed
                                  if self.tasks[i].message_id not in self.outcomes}
        if self._done():
            self._finish()
            return
        self.losses += 1
        if self.losses > self.max_losses:
            self._give_up(exitcodes.SUBMIT_NOT_CONFIRMED,
                          f"connection to {s.node.label} lost: {why}; giving up after "
                          f"{self.losses - 1} reconnect(s)")
            return
        if s.ready:
            print(f"workq-submit: connection to {s.node.label} lost: {why}; publishing "
                  f"{len(self.todo)} task(s) on the next node ({len(lost)} of them may "
                  f"arrive twice)", file=sys.stderr, flush=True)
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
            self._give_up(exitcodes.SUBMIT_USAGE, f"queue {self.queue} exists with other "
                          f"arguments than the config declares: {reason.reply_text}")
        elif not self._done():
            self._give_up(exitcodes.SUBMIT_NOT_CONFIRMED, f"channel closed: {_describe(reason)}")

    def blocked(self, s: _Session, reason: str) -> None:
        self.blocked_at = time.monotonic()
        print(f"workq-submit: the broker at {s.node.label} is blocking publishers ({reason}: "
              f"a memory or disk alarm); giving up in {self.confirm_timeout:g}s unless it "
              f"lifts", file=sys.stderr, flush=True)

    def unblocked(self, s: _Session) -> None:
        self.blocked_at = None
        self.progress_at = time.monotonic()
        print(f"workq-submit: the broker at {s.node.label} publishes again",
              file=sys.stderr, flush=True)
        self._publish_more()

    def _tick(self) -> None:
        """Once a second: the deadlines no broker callback will enforce for us."""
        if self.finishing:
            return
        self.ioloop.call_later(1, self._tick)
        self.progress.show(len(self.confirmed))
        s, now = self.session, time.monotonic()
        if s is None or s.abandoned:
            return
        if s.blocked and self.blocked_at is not None:
            if now - self.blocked_at > self.confirm_timeout:
                status = (exitcodes.SUBMIT_NOT_CONFIRMED if self.confirmed
                          else exitcodes.SUBMIT_UNREACHABLE)
                self._give_up(status, f"gave up after {self.confirm_timeout:g}s: the broker at "
                              f"{s.node.label} is still blocking publishers (alarm)")
        elif (s.pending or not s.ready) and s.conn.is_open \
                and now - self.progress_at > self.confirm_timeout:
            # Open but silent: a hung node. Heartbeats would take longer to notice.
            s.abandon()
            self.connection_lost(s, f"no answer for {self.confirm_timeout:g}s")

    # --- publishing ------------------------------------------------------

    def _publish_more(self) -> None:
        s = self.session
        if s is None or not s.ready or s.blocked or self.finishing:
            return
        tasks, todo, pending = self.tasks, self.todo, s.pending
        n = 0
        while todo and len(pending) < WINDOW:
            i = todo.popleft()
            s.publish(i, tasks[i])
            n += 1
        self.published += n
        self._maybe_finish()

    def confirmed_now(self, indexes: list[int], nack: bool) -> None:
        self.progress_at = time.monotonic()
        for i in indexes:
            if nack:
                self.failed[i] = "nacked by the broker"
            elif self.tasks[i].message_id in self.returned:
                self.failed[i] = f"unroutable: no queue named {self.queue}"
            else:
                self.failed.pop(i, None)
                self.confirmed.add(i)
        self.progress.update(len(self.confirmed))
        s = self.session
        if self.todo and s is not None and len(s.pending) < WINDOW // 2:
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
        mid = reply.get("message_id")
        secs = reply.get("seconds", 0)
        secs = secs if isinstance(secs, (int, float)) else 0
        # The reply's id, outcome and error text come from the queue: a control
        # character (C0 or C1, such as CSI) is printed escaped, not to the terminal.
        show = config_mod.escape
        if reply.get("outcome") not in FINAL_OUTCOMES and not reply.get("final"):
            print(show(f"{mid} {reply.get('outcome')} {secs:.3f}s (will be retried)"), flush=True)
            return
        if mid in self.outcomes:
            return
        self.outcomes[mid] = reply
        print(show(f"{mid} {reply.get('outcome')} {secs:.3f}s"
                   + (f" {reply['error']}" if reply.get("error") else "")), flush=True)
        self._maybe_finish()

    def _on_wait_timeout(self) -> None:
        if not self._done() and not self.finishing:
            self.timed_out = True
            self._give_up(exitcodes.SUBMIT_WAIT_TIMEOUT,
                          f"--timeout {self.timeout:g}s passed with "
                          f"{len(self.tasks) - len(self.outcomes)} outcome(s) missing")

    def _done(self) -> bool:
        if self.todo or (self.session is not None and self.session.pending):
            return False
        if self.wait:
            waiting = {self.tasks[i].message_id for i in self.confirmed - self.outcome_lost}
            return waiting <= set(self.outcomes)
        return True

    def _maybe_finish(self) -> None:
        if self._done():
            self._finish()

    def _give_up(self, status: int, message: str) -> None:
        self.error = self.error or (status, message)
        self._finish()

    def _finish(self) -> None:
        """Close the connection if it can still answer, and leave the loop (bounded)."""
        if self.finishing:
            return
        self.finishing = True
        self.progress.close()
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

    # --- result ----------------------------------------------------------

    def exit_status(self) -> int:
        err = sys.stderr
        unconfirmed = [i for i in range(len(self.tasks))
                       if i not in self.confirmed and i not in self.failed]
        if self.error and not self.published:
            # Nothing left this process: one line says why, no task list.
            print(f"workq-submit: {self.error[1]}", file=err)
            return self.error[0]
        for i in sorted(self.failed):
            print(f"workq-submit: task {self.tasks[i].name()} not accepted: {self.failed[i]}",
                  file=err)
        for i in unconfirmed:
            print(f"workq-submit: task {self.tasks[i].name()} not confirmed", file=err)
        for i in sorted(self.outcome_lost):
            if self.tasks[i].message_id not in self.outcomes:
                print(f"workq-submit: task {self.tasks[i].name()} confirmed, but its outcome "
                      f"was lost with the connection", file=err)
        if self.error:
            print(f"workq-submit: {self.error[1]}", file=err)
        if self.failed or unconfirmed:
            print(f"workq-submit: {len(self.confirmed)} of {len(self.tasks)} task(s) confirmed "
                  f"on queue {self.queue}; {len(unconfirmed)} not confirmed and "
                  f"{len(self.failed)} not accepted (each named above)", file=err)
            if not self.confirmed and self.error and self.error[0] == exitcodes.SUBMIT_UNREACHABLE:
                return exitcodes.SUBMIT_UNREACHABLE  # none got through: the broker's fault
            return exitcodes.SUBMIT_NOT_CONFIRMED
        if self.wait:
            if self.timed_out or any(self.tasks[i].message_id not in self.outcomes
                                     for i in self.outcome_lost):
                return exitcodes.SUBMIT_WAIT_TIMEOUT
            if any(o.get("outcome") != "success" for o in self.outcomes.values()):
                return exitcodes.SUBMIT_NOT_CONFIRMED
        if self.error:
            return self.error[0]
        return exitcodes.SUBMIT_OK


def _describe(error) -> str:
    return amqperrors.describe(error, CONNECT_TIMEOUT)


# --- requeue-dead --------------------------------------------------------

def connect_first(nodes: list[Node], confirm_timeout: float
                  ) -> tuple[pika.BlockingConnection | None, Node | None, list[str]]:
    """A blocking connection to the first node that takes it (also workqctl dead's)."""
    conn, node, errors = None, None, []
    for node in nodes:
        node.params.blocked_connection_timeout = confirm_timeout
        try:
            conn = pika.BlockingConnection(node.params)
            break
        except pika.exceptions.AMQPError as e:
            errors.append(f"{node.label}: {_describe(e)}")
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


def requeue_dead(nodes: list[Node], queue: str, confirm_timeout: float,
                 select: Callable[[pika.BasicProperties], bool] | None = None,
                 prog: str = "workq-submit") -> int:
    """Move dead-lettered tasks back, each acked on the dead queue only once its copy is
    confirmed on the work queue, so a failure half-way loses nothing. ``select`` picks
    which (workqctl dead requeue --reason/--id); the others stay, in their order."""
    from . import frames
    from .vocab import H_ATTEMPT, H_DEAD_AT, H_ERROR, H_QUEUE, H_REASON, dead_letter_queue
    # A dead letter from a foreign producer may hold a header pika cannot decode: it
    # must not abort this connection, and its copy must be one pika can encode.
    frames.install()
    dead = dead_letter_queue(queue)
    conn, node, errors = connect_first(nodes, confirm_timeout)
    if conn is None:
        print(f"{prog}: cannot connect to {'; '.join(errors)}", file=sys.stderr)
        return exitcodes.SUBMIT_UNREACHABLE

    def on_blocked(_conn, frame):
        print(f"{prog}: the broker at {node.label} is blocking publishers "
              f"({getattr(frame.method, 'reason', '') or 'alarm'}); giving up in "
              f"{confirm_timeout:g}s unless it lifts", file=sys.stderr, flush=True)
    conn.add_on_connection_blocked_callback(on_blocked)
    moved, skipped = 0, []
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        while True:
            method, props, body = ch.basic_get(dead, auto_ack=False)
            if method is None:
                break
            if select is not None and not select(props):
                # Held unacked, so not fetched again; closing the connection gives it back
                # (a return on close, not a nack: no "failed delivery" on RabbitMQ 4).
                skipped.append(method.delivery_tag)
                continue
            headers = {k: v for k, v in frames.safe_headers(props.headers).items()
                       if k not in (H_ATTEMPT, H_DEAD_AT, H_ERROR, H_QUEUE, H_REASON,
                                    "x-delivery-count", "x-death")}
            # A fresh first try: its time in the queue starts now.
            headers[vocab.H_SUBMITTED_MS] = int(time.time() * 1000)
            props.headers = headers
            try:
                ch.basic_publish("", queue, body, props, mandatory=True)
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError):
                ch.basic_nack(method.delivery_tag, requeue=True)
                print(f"{prog}: task {props.message_id} could not be moved to {queue} "
                      f"(no such queue?); it stays in {dead}", file=sys.stderr)
                return exitcodes.SUBMIT_NOT_CONFIRMED
            ch.basic_ack(method.delivery_tag)
            moved += 1
    except pika.exceptions.ChannelClosedByBroker as e:
        print(f"{prog}: {dead}: {e.reply_text}", file=sys.stderr)
        return exitcodes.SUBMIT_NOT_CONFIRMED if moved else exitcodes.SUBMIT_USAGE
    except pika.exceptions.ConnectionBlockedTimeout:
        print(f"{prog}: gave up after {confirm_timeout:g}s: the broker at {node.label} is "
              f"blocking publishers (alarm); moved {moved} task(s), the rest stays in {dead}",
              file=sys.stderr)
        return exitcodes.SUBMIT_NOT_CONFIRMED if moved else exitcodes.SUBMIT_UNREACHABLE
    except pika.exceptions.AMQPError as e:
        print(f"{prog}: connection to {node.label} lost after moving {moved} task(s): "
              f"{_describe(e)}; the rest stays in {dead} (the task being moved may now be in "
              f"both queues)", file=sys.stderr)
        return exitcodes.SUBMIT_NOT_CONFIRMED if moved else exitcodes.SUBMIT_UNREACHABLE
    finally:
        close_quietly(conn)
    print(f"{prog}: moved {moved} task(s) from {dead} back to {queue}", file=sys.stderr)
    return exitcodes.SUBMIT_OK


# --- delays ----------------------------------------------------------------

def prepare_delays(p: Plan) -> int | None:
    """The vhost's delay levels and the queue's delivery binding, before the first delayed
    publish; an exit status when that cannot be done."""
    conn, node, errors = connect_first(p.nodes, p.confirm_timeout)
    if conn is None:
        print(f"workq-submit: cannot connect to {'; '.join(errors)}", file=sys.stderr)
        return exitcodes.SUBMIT_UNREACHABLE
    try:
        ch = conn.channel()
        if p.declare is not None:
            ch.queue_declare(p.queue, durable=True, arguments=queue_arguments(p.declare))
        delays.prepare(ch, p.queue)
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            print(f"workq-submit: no queue {p.queue} on {node.label}: a delayed task needs "
                  f"its queue to exist now", file=sys.stderr)
        else:
            print(f"workq-submit: cannot prepare delayed delivery on {node.label}: "
                  f"{_describe(e)}", file=sys.stderr)
        return exitcodes.SUBMIT_NOT_CONFIRMED
    except pika.exceptions.AMQPError as e:
        print(f"workq-submit: cannot prepare delayed delivery on {node.label}: "
              f"{_describe(e)}", file=sys.stderr)
        return exitcodes.SUBMIT_UNREACHABLE
    finally:
        close_quietly(conn)
    return None


# --- main ----------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    nodes: list[Node]
    queue: str
    declare: config_mod.Queue | None
    tasks: list[Outgoing]
    headers: dict
    confirm_timeout: float
    due: float | None = None          # epoch seconds the tasks are held back until
    expires_ms: int | None = None     # epoch ms after which a delivered task is not run


def timing(args: argparse.Namespace, now: float) -> tuple[float | None, int | None]:
    """--delay/--at as the epoch time the tasks are due (None: at once), and --expires
    as epoch milliseconds; raises UsageError."""
    if args.delay is not None and args.at is not None:
        raise UsageError("give --delay or --at, not both")
    due = expires = None
    for option, value, read in (("--delay", args.delay, when.duration),
                                ("--at", args.at, when.moment),
                                ("--expires", args.expires, when.duration_or_moment)):
        if value is None:
            continue
        try:
            got = read(value)
        except ValueError as e:
            raise UsageError(f"{option}: {e}") from None
        if option == "--expires":
            expires = got
        else:
            due = now + got if option == "--delay" else got.timestamp()
    if due is not None and due - now > delays.MAX_DELAY:
        raise UsageError("a task can be held back at most 100 years")
    if due is not None and due - now < 0.5:
        due = None    # a time already past: at once
    expires_ms = None
    if expires is not None:
        expires_ms = int(((now + expires) if isinstance(expires, float)
                          else expires.timestamp()) * 1000)
    return due, expires_ms


def plan(args: argparse.Namespace) -> Plan:
    """Check every argument and read every file; raises UsageError or ConfigError."""
    if args.timeout is not None:
        if not args.wait:
            raise UsageError("--timeout only makes sense with --wait")
        seconds("--timeout", args.timeout)
    confirm_timeout = DEFAULT_CONFIRM_TIMEOUT if args.confirm_timeout is None \
        else seconds("--confirm-timeout", args.confirm_timeout)
    if args.priority is not None and not 0 <= args.priority <= 255:
        raise UsageError(f"--priority {args.priority}: must be 0-255")
    headers = parse_headers(args.header)
    due, expires_ms = timing(args, time.time())
    declare = None
    broker, source = config_mod.Broker(), "workq-submit"
    if args.config is not None:
        cfg = load_config(args.config)
        broker, source = cfg.broker, args.config
        queue = cfg.queues[0].name if args.queue is None else args.queue
        declare = next((q for q in cfg.queues if q.name == queue), None)
    else:
        queue = "tasks" if args.queue is None else args.queue
    queue_name("-q", queue)
    urls = [check_url(u) for u in (args.url or broker.urls)]
    password = password_override(args)
    if password is not None:
        # The command line's secret wins over the config's password_file, which the
        # connection would otherwise read again.
        broker = dataclasses.replace(broker, password=password, password_file=None)
    if args.requeue_dead is not None:
        if args.words or args.file is not None or args.wait:
            raise UsageError("--requeue-dead takes no tasks and no --wait")
        if due is not None or expires_ms is not None:
            raise UsageError("--requeue-dead moves tasks as they are: no --delay, --at or "
                             "--expires")
        queue_name("--requeue-dead", args.requeue_dead)
        queue_name("--requeue-dead", vocab.dead_letter_queue(args.requeue_dead))
        tasks = []
    else:
        tasks = build_tasks(args)
    nodes = nodes_for(urls, broker, source, confirm_timeout)
    return Plan(nodes, queue, declare, tasks, headers, confirm_timeout, due, expires_ms)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        p = plan(args)
    except config_mod.ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return exitcodes.SUBMIT_USAGE
    except (UsageError, config_mod.Invalid) as e:
        print(f"workq-submit: {e}", file=sys.stderr)
        return exitcodes.SUBMIT_USAGE
    if args.requeue_dead is not None:
        return requeue_dead(p.nodes, args.requeue_dead, p.confirm_timeout)
    if p.due is not None:
        status = prepare_delays(p)
        if status is not None:
            return status
    sub = Submitter(p.nodes, p.queue, p.declare, p.tasks, p.headers, args.priority, args.wait,
                    args.timeout, p.confirm_timeout)
    sub.due, sub.expires_ms = p.due, p.expires_ms
    sub.run()
    status = sub.exit_status()
    if status == exitcodes.SUBMIT_OK and not args.wait:
        twice = (f" ({sub.republished} published again after a lost connection: they may "
                 f"arrive twice)" if sub.republished else "")
        print(f"workq-submit: {len(p.tasks)} task(s) confirmed on queue {p.queue}{twice}",
              file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
