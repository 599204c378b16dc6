"""``workqctl dead QUEUE ...``: the dead-letter queue QUEUE.dead, over AMQP, by workqctl itself.

The daemon is not involved: workqctl connects to the config's broker (as
workq-submit does, with the client's connection code) so dead letters can be handled
while workqd is stopped. ``list`` and ``show`` take every message unacked and
give them all back by closing the connection; ``requeue`` is
workq-submit's --requeue-dead with a selection: each copy is confirmed on QUEUE
before its dead letter is acked. A dead letter with a header pika cannot decode
(put there by a foreign producer) is read through the decode guard (frames.py)
and listed as ``malformed``, the header named in its error.
"""

from __future__ import annotations

import argparse
import sys

import pika
import pika.exceptions

from . import config as config_mod
from . import cliargs, exitcodes, frames, requeue, vocab
from .client import close_quietly, connect_first

CONFIRM_TIMEOUT = 30.0
ERROR_WIDTH = 60


def add_parser(sub) -> None:
    d = sub.add_parser("dead", help="the queue's dead letters (QUEUE.dead), over AMQP")
    d.add_argument("queue")
    acts = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = acts.add_parser("list", help="one line per dead letter")
    s.add_argument("--json", action="store_true")
    s = acts.add_parser("show", help="one dead letter: properties, headers and body")
    s.add_argument("id", help="its message id")
    s = acts.add_parser("requeue", help="move dead letters back to QUEUE, each confirmed")
    s.add_argument("--reason", choices=vocab.DEAD_LETTER_REASONS,
                   help="only those dead-lettered for this reason")
    s.add_argument("--id", action="append", default=[], dest="ids", metavar="ID",
                   help="only this message id (repeatable)")
    s = acts.add_parser("purge", help="delete every dead letter")
    s.add_argument("--yes", action="store_true", help="really delete them")


def _header(props, name: str):
    headers = props.headers if isinstance(props.headers, dict) else {}
    value = headers.get(name)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def reason_of(props):
    """x-workq-reason; ``malformed`` for a letter pika could not decode in full."""
    return vocab.REASON_MALFORMED if frames.problems(props) else _header(props, vocab.H_REASON)


def error_of(props):
    """x-workq-error, after what could not be decoded, if anything."""
    error, found = _header(props, vocab.H_ERROR), frames.problems(props)
    if not found:
        return error
    return f"undecodable: {frames.describe(found)}" + (f"; {error}" if error else "")


def describe(props, body: bytes) -> dict:
    """One dead letter as plain data."""
    return {"id": props.message_id, "reason": reason_of(props),
            "attempt": _header(props, vocab.H_ATTEMPT), "dead_at": _header(props, vocab.H_DEAD_AT),
            "queue": _header(props, vocab.H_QUEUE), "error": error_of(props),
            "bytes": len(body)}


def peek(nodes, dead: str) -> list[tuple]:
    """Every message in ``dead`` as (properties, body), all given back unchanged."""
    conn, node, errors = connect_first(nodes, CONFIRM_TIMEOUT)
    if conn is None:
        raise _Fail(exitcodes.CTL_UNREACHABLE, f"cannot connect to {'; '.join(errors)}")
    out = []
    try:
        ch = conn.channel()
        while True:
            method, props, body = ch.basic_get(dead, auto_ack=False)
            if method is None:
                break
            out.append((props, body))
        # Given back by closing the channel (below), not by a nack: a return on close
        # is not a failed delivery, which RabbitMQ 4 counts toward a delivery limit.
    except pika.exceptions.ChannelClosedByBroker as e:
        raise _Fail(exitcodes.CTL_REFUSED, f"{dead}: {e.reply_text}")
    except pika.exceptions.AMQPError as e:
        raise _Fail(exitcodes.CTL_UNREACHABLE, f"{dead}: connection lost: {e!r} (nothing "
                    f"was changed: unacked messages return to the queue)")
    finally:
        close_quietly(conn)
    return out


def purge(nodes, dead: str) -> int:
    conn, node, errors = connect_first(nodes, CONFIRM_TIMEOUT)
    if conn is None:
        raise _Fail(exitcodes.CTL_UNREACHABLE, f"cannot connect to {'; '.join(errors)}")
    try:
        ch = conn.channel()
        ch.queue_declare(dead, passive=True)
        return ch.queue_purge(dead).method.message_count
    except pika.exceptions.ChannelClosedByBroker as e:
        raise _Fail(exitcodes.CTL_REFUSED, f"{dead}: {e.reply_text}")
    except pika.exceptions.AMQPError as e:
        raise _Fail(exitcodes.CTL_UNREACHABLE, f"{dead}: connection lost: {e!r}")
    finally:
        close_quietly(conn)


class _Fail(Exception):
    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code


def _short(text, width: int) -> str:
    text = config_mod.escape(" ".join(str(text or "-").split()))
    return text if len(text) <= width else text[:width - 1] + "…"


# What a workqctl command that talks AMQP itself refuses before connecting.
USAGE_ERRORS = (config_mod.ConfigError, cliargs.UsageError, config_mod.Invalid)


def usage_error(e: Exception) -> int:
    """Print a refused config or argument, one line per problem; the exit status."""
    lines = e.problems if isinstance(e, config_mod.ConfigError) else [f"workqctl: {e}"]
    for line in lines:
        print(line, file=sys.stderr)
    return exitcodes.CTL_USAGE


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _Fail as e:
        print(f"workqctl: {e}", file=sys.stderr)
        return e.code
    except USAGE_ERRORS as e:
        return usage_error(e)


def _run(args: argparse.Namespace) -> int:
    cliargs.queue_name("dead", args.queue)
    dead = vocab.dead_letter_queue(args.queue)
    cliargs.queue_name("dead", dead)
    if args.action == "purge" and not args.yes:
        print(f"workqctl: purge deletes every task in {dead} for good: add --yes",
              file=sys.stderr)
        return exitcodes.CTL_USAGE
    # Before connecting: a dead letter pika cannot decode must not abort the connection.
    frames.install()
    cfg = cliargs.load_config(args.config)
    nodes = cliargs.nodes_for(list(cfg.broker.urls), cfg.broker, args.config, CONFIRM_TIMEOUT)
    return _ACTIONS[args.action](args, nodes, dead)


def _list(args: argparse.Namespace, nodes, dead: str) -> int:
    import json
    items = [describe(p, b) for p, b in peek(nodes, dead)]
    if args.json:
        print(json.dumps(items, indent=2, default=str))
        return exitcodes.CTL_OK
    rows = [("ID", "REASON", "ATTEMPT", "DEAD AT", "ERROR")]
    rows += [(_short(i["id"], 40), _short(i["reason"], 12), _short(i["attempt"], 8),
              _short(i["dead_at"], 25), _short(i["error"], ERROR_WIDTH)) for i in items]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    print(f"{len(items)} dead letter(s) in {dead}", file=sys.stderr)
    return exitcodes.CTL_OK


def _show(args: argparse.Namespace, nodes, dead: str) -> int:
    for props, body in peek(nodes, dead):
        if props.message_id == args.id:
            _print_letter(props, body)
            return exitcodes.CTL_OK
    print(f"workqctl: no message {args.id!r} in {dead}", file=sys.stderr)
    return exitcodes.CTL_REFUSED


def _print_letter(props, body: bytes) -> None:
    # Every field came from a publisher: a control character (C0 or C1, such as
    # CSI) is shown escaped, never sent to the terminal.
    show = config_mod.escape
    print(show(f"message id: {props.message_id}"))
    for name in ("content_type", "correlation_id", "priority", "timestamp", "reply_to"):
        value = getattr(props, name)
        if value is not None:
            print(show(f"{name.replace('_', ' ')}: {value}"))
    for path, why in frames.problems(props):
        print(show(f"undecodable: {path}: {why}"))
    headers = props.headers if isinstance(props.headers, dict) else {}
    for k, v in sorted(headers.items(), key=lambda kv: str(kv[0])):
        v = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        print(show(f"header {k}: {v}"))
    print(f"body ({len(body)} bytes):")
    # Line breaks and tabs of the body are kept as they are.
    sys.stdout.write("\n".join("\t".join(show(part) for part in line.split("\t"))
                               for line in body.decode("utf-8", "replace").split("\n")))
    if body and not body.endswith(b"\n"):
        print()


def _requeue(args: argparse.Namespace, nodes, dead: str) -> int:
    ids, reason = set(args.ids), args.reason

    def select(props) -> bool:
        return ((not ids or props.message_id in ids)
                and (reason is None or reason_of(props) == reason))
    code = requeue.requeue_dead(nodes, args.queue, CONFIRM_TIMEOUT,
                               select if ids or reason else None, prog="workqctl")
    return {exitcodes.SUBMIT_OK: exitcodes.CTL_OK,
            exitcodes.SUBMIT_UNREACHABLE: exitcodes.CTL_UNREACHABLE,
            exitcodes.SUBMIT_USAGE: exitcodes.CTL_USAGE}.get(code, exitcodes.CTL_REFUSED)


def _purge(args: argparse.Namespace, nodes, dead: str) -> int:
    n = purge(nodes, dead)
    print(f"workqctl: purged {n} dead letter(s) from {dead}", file=sys.stderr)
    return exitcodes.CTL_OK


_ACTIONS = {"list": _list, "show": _show, "requeue": _requeue, "purge": _purge}
