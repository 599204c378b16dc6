"""``workq-submit``: publish tasks safely — persistent, confirmed, mandatory.

A command line over ``workqd.client``: it checks every argument and reads every
file before the first connection (exit 2, one line), hands the tasks to the
client's batch (pipelined confirms, failover over the nodes of a cluster, every
wait with a deadline: client.py says how), and reports from its result. Every
task that the broker did not confirm, or returned as unroutable, is named on
stderr and the exit status says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

from . import client as client_mod
from . import config as config_mod
from . import delays, exitcodes, vocab, when
from .cliargs import (UsageError, _size, check_url, load_config, nodes_for,  # noqa: F401
                      queue_name, read_regular, utf8)
from .client import Batch, BatchHooks, Client, Node, Outgoing, SubmitError  # noqa: F401
from .progress import Progress
from .requeue import requeue_dead

LINE_MAX = 16 * 1024 * 1024    # one task; RabbitMQ 4.0's default max_message_size, workqd's max_body
FILE_MAX = 256 * 1024 * 1024   # one --file; bigger batches are split (split -C 200M)
TASKS_MAX = 1_000_000          # tasks in one run; each is held in memory until confirmed
SECONDS_MAX = 7 * 24 * 3600    # the longest --timeout / --confirm-timeout
DEFAULT_CONFIRM_TIMEOUT = client_mod.CONFIRM_TIMEOUT
PASSWORD_ENV = "WORKQ_PASSWORD"


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


def parse_headers(items: list[str]) -> dict:
    headers = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--header {item!r}: must be KEY=VALUE")
        headers[utf8(f"--header {key!r}", key)] = utf8(f"--header {key!r}", value, None)
    return headers


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
        lines = data.split(b"\n")
        bodies: list[tuple[bytes, int | None]] = [
            (line, n) for n, line in enumerate(lines, 1) if line.strip()]
        # Whichever limit a line-by-line reader would hit first; a file no longer than
        # LINE_MAX cannot hold a line that is.
        long = next((n for n, line in enumerate(lines, 1) if len(line) > LINE_MAX), None) \
            if len(data) > LINE_MAX else None
        if long is not None and sum(1 for _, n in bodies if n < long) <= TASKS_MAX:
            raise UsageError(f"{name}: line {long} is longer than {_size(LINE_MAX)}")
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
    # Ids are made as the tasks are first published, so each carries its publish time.
    return [Outgoing("", body, line) for body, line in bodies]


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


# --- reporting -----------------------------------------------------------

# Why a batch gave up, as workq-submit's exit status.
STATUS = {client_mod.UNREACHABLE: exitcodes.SUBMIT_UNREACHABLE,
          client_mod.NOT_CONFIRMED: exitcodes.SUBMIT_NOT_CONFIRMED,
          client_mod.MISMATCH: exitcodes.SUBMIT_USAGE,
          client_mod.WAIT_TIMEOUT: exitcodes.SUBMIT_WAIT_TIMEOUT,
          client_mod.INTERRUPTED: exitcodes.SUBMIT_NOT_CONFIRMED}


class Report(BatchHooks):
    """What the operator sees while a batch runs: alarms, failovers, --wait's outcome
    lines, and on a terminal a progress line (never with --wait, whose outcome lines
    own the terminal)."""

    def __init__(self, total: int, wait: bool):
        self.bar = Progress(0 if wait else total)

    def progress(self, confirmed: int, total: int) -> None:
        self.bar.update(confirmed)

    def tick(self, confirmed: int, total: int) -> None:
        self.bar.show(confirmed)

    def blocked(self, node: str, reason: str, confirm_timeout: float) -> None:
        print(f"workq-submit: the broker at {node} is blocking publishers ({reason}: "
              f"a memory or disk alarm); giving up in {confirm_timeout:g}s unless it "
              f"lifts", file=sys.stderr, flush=True)

    def unblocked(self, node: str) -> None:
        print(f"workq-submit: the broker at {node} publishes again", file=sys.stderr, flush=True)

    def failover(self, node: str, why: str, todo: int, lost: int) -> None:
        print(f"workq-submit: connection to {node} lost: {why}; publishing {todo} task(s) "
              f"on the next node ({lost} of them may arrive twice)", file=sys.stderr, flush=True)

    def outcome(self, reply: dict, final: bool) -> None:
        mid = reply.get("message_id")
        secs = reply.get("seconds", 0)
        secs = secs if isinstance(secs, (int, float)) else 0
        # The reply's id, outcome and error text come from the queue: a control
        # character (C0 or C1, such as CSI) is printed escaped, not to the terminal.
        show = config_mod.escape
        if not final:
            print(show(f"{mid} {reply.get('outcome')} {secs:.3f}s (will be retried)"), flush=True)
            return
        print(show(f"{mid} {reply.get('outcome')} {secs:.3f}s"
                   + (f" {reply['error']}" if reply.get("error") else "")), flush=True)

    def finished(self) -> None:
        self.bar.close()


def exit_status(b: Batch) -> int:
    """Name every task not confirmed on stderr; the exit status of the run."""
    err = sys.stderr
    error = None if b.error is None else (STATUS[b.error[0]], b.error[1])
    if error and not b.published:
        # Nothing left this process: one line says why, no task list.
        print(f"workq-submit: {error[1]}", file=err)
        return error[0]
    unconfirmed = b.unconfirmed()
    for i in sorted(b.failed):
        print(f"workq-submit: task {b.tasks[i].name()} not accepted: {b.failed[i]}", file=err)
    for i in unconfirmed:
        print(f"workq-submit: task {b.tasks[i].name()} not confirmed", file=err)
    for i in sorted(b.outcome_lost):
        if b.tasks[i].message_id not in b.outcomes:
            print(f"workq-submit: task {b.tasks[i].name()} confirmed, but its outcome "
                  f"was lost with the connection", file=err)
    if error:
        print(f"workq-submit: {error[1]}", file=err)
    if b.failed or unconfirmed:
        print(f"workq-submit: {len(b.confirmed)} of {len(b.tasks)} task(s) confirmed "
              f"on queue {b.queue}; {len(unconfirmed)} not confirmed and "
              f"{len(b.failed)} not accepted (each named above)", file=err)
        if not b.confirmed and error and error[0] == exitcodes.SUBMIT_UNREACHABLE:
            return exitcodes.SUBMIT_UNREACHABLE  # none got through: the broker's fault
        return exitcodes.SUBMIT_NOT_CONFIRMED
    if b.wait:
        if b.timed_out or any(b.tasks[i].message_id not in b.outcomes for i in b.outcome_lost):
            return exitcodes.SUBMIT_WAIT_TIMEOUT
        if any(o.get("outcome") != "success" for o in b.outcomes.values()):
            return exitcodes.SUBMIT_NOT_CONFIRMED
    if error:
        return error[0]
    return exitcodes.SUBMIT_OK


# --- main ----------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    broker: config_mod.Broker   # with the URLs to use, in order
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
    broker = dataclasses.replace(broker, urls=tuple(urls))
    return Plan(broker, nodes, queue, declare, tasks, headers, confirm_timeout, due, expires_ms)


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
    client = Client(broker=p.broker, confirm_timeout=p.confirm_timeout, name="workq-submit")
    if p.due is not None:
        try:
            client.prepare_due(p.queue, p.declare)
        except SubmitError as e:
            print(f"workq-submit: {e}", file=sys.stderr)
            return STATUS[e.kind]
    batch = client.submit_batch(p.tasks, p.queue, declare=p.declare, headers=p.headers,
                                priority=args.priority, due=p.due, expires_ms=p.expires_ms,
                                wait=args.wait, wait_timeout=args.timeout,
                                hooks=Report(len(p.tasks), args.wait))
    status = exit_status(batch)
    if status == exitcodes.SUBMIT_OK and not args.wait:
        twice = (f" ({batch.republished} published again after a lost connection: they may "
                 f"arrive twice)" if batch.republished else "")
        print(f"workq-submit: {len(p.tasks)} task(s) confirmed on queue {p.queue}{twice}",
              file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
