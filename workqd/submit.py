"""``workq-submit``: publish tasks safely — persistent, confirmed, mandatory.

Confirms are pipelined: up to WINDOW messages are in flight at once and each
confirm frees room for more, so a file of 20,000 lines costs a few round trips,
not 20,000. Every task that the broker did not confirm, or returned as
unroutable, is named on stderr and the exit status says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from . import exitcodes
from . import config as config_mod
from .broker import connection_parameters, queue_arguments, redact

WINDOW = 5000          # unconfirmed messages in flight at most
REPLY_TO = "amq.rabbitmq.reply-to"
FINAL_OUTCOMES = {"success", "dead_letter"}


class UsageError(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="workq-submit",
        description="Publish tasks to a workqd queue with publisher confirms. WORDS are joined "
        "with spaces into one task; --file publishes one task per line.")
    p.add_argument("-c", "--config", help="workqd config: its broker, and its queue declared "
                   "exactly as the daemon declares it")
    p.add_argument("--url", help=f"broker URL (default: the config's, else {config_mod.DEFAULT_URL})")
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
    p.add_argument("--requeue-dead", metavar="QUEUE",
                   help="move every task in QUEUE.dead back to QUEUE (after fixing the cause), "
                   "as a first try again; nothing else is published")
    p.add_argument("words", nargs="*", metavar="WORDS")
    return p.parse_args(argv)


def build_tasks(args: argparse.Namespace) -> list[tuple[str, bytes]]:
    """(message id, body) for every task the arguments describe."""
    if args.words == ["-"] and not args.file:
        args.file, args.words = "-", []  # a lone "-" reads tasks from stdin, like --file -
    if args.file and args.words:
        raise UsageError("give WORDS or --file, not both")
    if args.file:
        try:
            if args.file == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(args.file, "rb") as f:
                    data = f.read()
        except OSError as e:
            raise UsageError(f"{args.file}: {e.strerror}") from None
        bodies = [line for line in data.split(b"\n") if line.strip()]
        if not bodies:
            raise UsageError(f"{args.file}: no tasks (no non-empty lines)")
    else:
        # As in the RabbitMQ tutorial's new_task.py.
        bodies = [" ".join(args.words).encode() or b"Hello World!"]
    if args.message_id is not None:
        if len(bodies) != 1:
            raise UsageError("--message-id needs exactly one task")
        return [(args.message_id, bodies[0])]
    return [(uuid.uuid4().hex, body) for body in bodies]


def parse_headers(items: list[str]) -> dict:
    headers = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--header {item!r}: must be KEY=VALUE")
        headers[key] = value
    return headers


class Publisher:
    """Publishes ``tasks`` on one SelectConnection and collects confirms and replies."""

    def __init__(self, urls, broker, queue: str, declare: config_mod.Queue | None,
                 tasks: list[tuple[str, bytes]], headers: dict, priority: int | None,
                 wait: bool, timeout: float | None):
        self.urls = list(urls)
        self.broker = broker
        self.queue = queue
        self.declare = declare
        self.tasks = tasks
        self.headers = headers or None
        self.priority = priority
        self.wait = wait
        self.timeout = timeout
        self.ioloop = IOLoop()
        self.conn = None
        self.channel = None
        self.next_index = 0        # next task to publish
        self.seq = 0               # publish sequence on the channel (= confirm tag)
        self.pending: dict[int, int] = {}   # confirm tag -> task index
        self.confirmed: set[int] = set()
        self.failed: dict[int, str] = {}    # task index -> why
        self.returned: set[str] = set()     # message ids returned as unroutable
        self.outcomes: dict[str, dict] = {}
        self.error: tuple[int, str] | None = None  # (exit status, message) if we gave up
        self.started = time.monotonic()
        self.timed_out = False

    # --- connection ------------------------------------------------------

    def run(self) -> None:
        self._connect()
        if self.timeout is not None and self.wait:
            self.ioloop.call_later(self.timeout, self._on_timeout)
        self.ioloop.start()

    def _connect(self) -> None:
        url = self.urls[0]
        try:
            params = connection_parameters(self.broker, url, "workq-submit")
        except (ValueError, OSError) as e:
            self._give_up(exitcodes.SUBMIT_USAGE, f"cannot use broker URL {redact(url)}: {e}")
            return
        self.conn = pika.SelectConnection(params, on_open_callback=self._on_open,
                                          on_open_error_callback=self._on_open_error,
                                          on_close_callback=self._on_closed,
                                          custom_ioloop=self.ioloop)

    def _on_open_error(self, conn, error) -> None:
        self.conn = None
        url = self.urls.pop(0)
        if self.urls and not isinstance(error, pika.exceptions.ProbableAuthenticationError):
            self._connect()  # try the next node of the cluster
            return
        self._give_up(exitcodes.SUBMIT_UNREACHABLE, f"cannot connect to {redact(url)}: "
                      f"{_describe(error)}")

    def _on_closed(self, conn, reason) -> None:
        self.conn = None
        if not self._done():
            self.error = self.error or (exitcodes.SUBMIT_NOT_CONFIRMED,
                                        f"connection lost: {_describe(reason)}")
        self.ioloop.stop()

    def _give_up(self, status: int, message: str) -> None:
        self.error = self.error or (status, message)
        if self.conn is not None and self.conn.is_open:
            self.conn.close()
        else:
            self.ioloop.stop()

    def _on_open(self, conn) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, ch) -> None:
        self.channel = ch
        ch.add_on_close_callback(self._on_channel_closed)
        ch.add_on_return_callback(self._on_return)
        ch.confirm_delivery(self._on_confirm, callback=lambda _: self._declare())

    def _on_channel_closed(self, ch, reason) -> None:
        code = getattr(reason, "reply_code", 0)
        if code == 406 and self.declare is not None:
            self._give_up(exitcodes.SUBMIT_USAGE, f"queue {self.queue} exists with other "
                          f"arguments than the config declares: {reason.reply_text}")
        elif not self._done():
            self._give_up(exitcodes.SUBMIT_NOT_CONFIRMED, f"channel closed: {_describe(reason)}")

    def _declare(self) -> None:
        if self.declare is None:
            self._subscribe_replies()
            return
        q = self.declare
        self.channel.queue_declare(q.name, durable=True, arguments=queue_arguments(q),
                                   callback=lambda _: self._subscribe_replies())

    def _subscribe_replies(self) -> None:
        if self.wait:
            self.channel.basic_consume(REPLY_TO, self._on_reply, auto_ack=True,
                                       callback=lambda _: self._publish_more())
        else:
            self._publish_more()

    # --- publishing ------------------------------------------------------

    def _publish_more(self) -> None:
        ch = self.channel
        while self.next_index < len(self.tasks) and len(self.pending) < WINDOW:
            i = self.next_index
            message_id, body = self.tasks[i]
            props = pika.BasicProperties(
                delivery_mode=2, message_id=message_id, headers=self.headers,
                priority=self.priority, timestamp=int(time.time()),
                reply_to=REPLY_TO if self.wait else None, content_type="text/plain")
            ch.basic_publish("", self.queue, body, props, mandatory=True)
            self.seq += 1
            self.pending[self.seq] = i
            self.next_index += 1
        self._maybe_finish()

    def _on_confirm(self, frame) -> None:
        m = frame.method
        tags = [t for t in self.pending if t <= m.delivery_tag] if m.multiple else [m.delivery_tag]
        nack = isinstance(m, pika.spec.Basic.Nack)
        for tag in tags:
            i = self.pending.pop(tag, None)
            if i is None:
                continue
            if nack:
                self.failed[i] = "nacked by the broker"
            elif self.tasks[i][0] in self.returned:
                self.failed[i] = f"unroutable: no queue named {self.queue}"
            else:
                self.confirmed.add(i)
        if self.next_index < len(self.tasks) and len(self.pending) < WINDOW // 2:
            self._publish_more()
        else:
            self._maybe_finish()

    def _on_return(self, ch, method, props, body) -> None:
        # A Basic.Return always precedes the confirm of the same message.
        self.returned.add(props.message_id)

    def _on_reply(self, ch, method, props, body) -> None:
        try:
            reply = json.loads(body)
        except ValueError:
            return
        mid = reply.get("message_id")
        if reply.get("outcome") not in FINAL_OUTCOMES and not reply.get("final"):
            print(f"{mid} {reply.get('outcome')} {reply.get('seconds', 0):.3f}s "
                  f"(will be retried)", flush=True)
            return
        if mid in self.outcomes:
            return
        self.outcomes[mid] = reply
        print(f"{mid} {reply.get('outcome')} {reply.get('seconds', 0):.3f}s"
              + (f" {reply['error']}" if reply.get("error") else ""), flush=True)
        self._maybe_finish()

    def _on_timeout(self) -> None:
        if not self._done():
            self.timed_out = True
            self._give_up(exitcodes.SUBMIT_WAIT_TIMEOUT,
                          f"--timeout {self.timeout:g}s passed with "
                          f"{len(self.confirmed) - len(self.outcomes)} outcome(s) missing")

    def _done(self) -> bool:
        if self.next_index < len(self.tasks) or self.pending:
            return False
        if self.wait:
            waiting = {self.tasks[i][0] for i in self.confirmed}
            return waiting <= set(self.outcomes)
        return True

    def _maybe_finish(self) -> None:
        if self._done() and self.conn is not None and self.conn.is_open:
            self.conn.close()

    # --- result ----------------------------------------------------------

    def exit_status(self) -> int:
        for i in sorted(self.failed):
            print(f"workq-submit: task {self.tasks[i][0]} not accepted: {self.failed[i]}",
                  file=sys.stderr)
        unconfirmed = [i for i in range(len(self.tasks))
                       if i not in self.confirmed and i not in self.failed]
        if self.error and self.error[0] in (exitcodes.SUBMIT_UNREACHABLE, exitcodes.SUBMIT_USAGE) \
                and not self.confirmed:
            print(f"workq-submit: {self.error[1]}", file=sys.stderr)
            return self.error[0]
        for i in unconfirmed:
            print(f"workq-submit: task {self.tasks[i][0]} not confirmed", file=sys.stderr)
        if self.error:
            print(f"workq-submit: {self.error[1]}", file=sys.stderr)
        if self.failed or unconfirmed:
            return exitcodes.SUBMIT_NOT_CONFIRMED
        if self.wait:
            if self.timed_out:
                return exitcodes.SUBMIT_WAIT_TIMEOUT
            if any(o.get("outcome") != "success" for o in self.outcomes.values()):
                return exitcodes.SUBMIT_NOT_CONFIRMED
        if self.error:
            return self.error[0]
        return exitcodes.SUBMIT_OK


def _describe(error) -> str:
    if isinstance(error, pika.exceptions.ProbableAuthenticationError):
        return "login refused (check user and password)"
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        return "access refused (check the vhost and permissions)"
    text = str(error) or ", ".join(map(str, getattr(error, "args", ()))) or type(error).__name__
    return text


def requeue_dead(urls, broker, queue: str) -> int:
    """Move dead-lettered tasks back, each acked on the dead queue only once its copy is
    confirmed on the work queue, so a failure half-way loses nothing."""
    from .broker import H_ATTEMPT, H_DEAD_AT, H_ERROR, H_QUEUE, H_REASON
    dead = f"{queue}.dead"
    try:
        conn = pika.BlockingConnection([connection_parameters(broker, u, "workq-submit")
                                        for u in urls])
    except pika.exceptions.AMQPError as e:
        print(f"workq-submit: cannot connect: {_describe(e)}", file=sys.stderr)
        return exitcodes.SUBMIT_UNREACHABLE
    moved = 0
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        while True:
            method, props, body = ch.basic_get(dead, auto_ack=False)
            if method is None:
                break
            headers = {k: v for k, v in (props.headers or {}).items()
                       if k not in (H_ATTEMPT, H_DEAD_AT, H_ERROR, H_QUEUE, H_REASON,
                                    "x-delivery-count", "x-death")}
            props.headers = headers or None
            try:
                ch.basic_publish("", queue, body, props, mandatory=True)
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError):
                ch.basic_nack(method.delivery_tag, requeue=True)
                print(f"workq-submit: task {props.message_id} could not be moved to {queue} "
                      f"(no such queue?); it stays in {dead}", file=sys.stderr)
                return exitcodes.SUBMIT_NOT_CONFIRMED
            ch.basic_ack(method.delivery_tag)
            moved += 1
    except pika.exceptions.ChannelClosedByBroker as e:
        print(f"workq-submit: {dead}: {e.reply_text}", file=sys.stderr)
        return exitcodes.SUBMIT_NOT_CONFIRMED if moved else exitcodes.SUBMIT_USAGE
    finally:
        if conn.is_open:
            conn.close()
    print(f"workq-submit: moved {moved} task(s) from {dead} back to {queue}", file=sys.stderr)
    return exitcodes.SUBMIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.timeout is not None and not args.wait:
            raise UsageError("--timeout only makes sense with --wait")
        if args.priority is not None and not 0 <= args.priority <= 255:
            raise UsageError(f"--priority {args.priority}: must be 0-255")
        headers = parse_headers(args.header)
        declare = None
        broker = config_mod.Broker()
        if args.config:
            cfg = config_mod.load(args.config)
            broker = cfg.broker
            queue = args.queue or cfg.queues[0].name
            declare = next((q for q in cfg.queues if q.name == queue), None)
        else:
            queue = args.queue or "tasks"
        urls = [args.url] if args.url else list(broker.urls)
        if args.url:
            config_mod.amqp_url(args.url)
        if args.requeue_dead:
            if args.words or args.file or args.wait:
                raise UsageError("--requeue-dead takes no tasks and no --wait")
            return requeue_dead(urls, broker, args.requeue_dead)
        tasks = build_tasks(args)
    except config_mod.ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return exitcodes.SUBMIT_USAGE
    except (UsageError, config_mod.Invalid) as e:
        print(f"workq-submit: {e}", file=sys.stderr)
        return exitcodes.SUBMIT_USAGE
    pub = Publisher(urls, broker, queue, declare, tasks, headers, args.priority, args.wait,
                    args.timeout)
    pub.run()
    status = pub.exit_status()
    if status == exitcodes.SUBMIT_OK and not args.wait:
        print(f"workq-submit: {len(tasks)} task(s) confirmed on queue {queue}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
