"""The floor: a plain pika consumer as in the RabbitMQ "Work Queues" tutorial.

    python pika_consumer.py --queue Q --prefetch N [--task benchtasks:stamp]

BlockingConnection, ``basic_qos(prefetch_count=N)``, run the task, then ack that
one message. The task runs in the connection's thread (no hand-off), so this is
what any framework's per-task overhead is measured against.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import pika

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default=URL)
    p.add_argument("--queue", required=True)
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--task", default="benchtasks:stamp")
    a = p.parse_args()
    module, _, name = a.task.partition(":")
    task = getattr(importlib.import_module(module), name)

    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=a.prefetch)

    def on_message(ch, method, properties, body):
        task(body, None)
        ch.basic_ack(delivery_tag=method.delivery_tag)

    ch.basic_consume(queue=a.queue, on_message_callback=on_message)
    # The bench ends this process with TERM (default action) once every task ran;
    # each ack was already written to the socket, so nothing is requeued.
    ch.start_consuming()
    return 0


if __name__ == "__main__":
    sys.exit(main())
