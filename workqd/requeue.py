"""Moving dead letters back to their work queue (workq-submit --requeue-dead, workqctl
dead requeue): each copy is confirmed on the work queue before its dead letter is acked."""

from __future__ import annotations

import sys
import time
from typing import Callable

import pika
import pika.exceptions

from . import exitcodes, vocab
from .client import Node, describe, close_quietly, connect_first


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
              f"{describe(e)}; the rest stays in {dead} (the task being moved may now be in "
              f"both queues)", file=sys.stderr)
        return exitcodes.SUBMIT_NOT_CONFIRMED if moved else exitcodes.SUBMIT_UNREACHABLE
    finally:
        close_quietly(conn)
    print(f"{prog}: moved {moved} task(s) from {dead} back to {queue}", file=sys.stderr)
    return exitcodes.SUBMIT_OK
