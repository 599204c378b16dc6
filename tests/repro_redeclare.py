"""RabbitMQ 3.10's behaviour that workqd's consumer check answers, with plain pika only.

    python tests/repro_redeclare.py [RUNS]

Starts the throwaway 3-node cluster of tests/brokers.py (ports 5681-5683), and per
run: a quorum queue with one consumer on each node; ``rabbitmqctl delete_queue``;
at once another client declares the queue again and publishes 20 tasks. Consumers
that get the broker's cancel declare again and consume on a new connection (as
workqd's workers do). After 5 s without all 20 delivered, every consumer moves to
a new connection anyway (what workqd's consumer check does after two checks).

Prints per run the cancels seen, tasks delivered before and after that move, and
the queue's ready count and consumers. 2026-12-02, 3.10.8, 30 runs: 24 got no
cancel and no task (17 ready, 3 consumers counted: each old consumer took one task
and never delivered it); after the move every run got all 20 (in one, the last
task came back more than 15 s after the move). Not collected by
pytest (no test_ prefix): the suite's proof is
test_cluster.py::test_workers_consume_again_after_the_queue_is_deleted_and_redeclared.
"""

from __future__ import annotations

import sys
import time
import uuid

import pika

from brokers import Cluster

ARGS = {"x-queue-type": "quorum"}
NODES = ("wqa", "wqb", "wqc")
TASKS = 20


class Consumer:
    def __init__(self, url: str, queue: str, got: list):
        self.url, self.queue, self.got = url, queue, got
        self.cancels = 0
        self.move = False
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self._consume()

    def _consume(self) -> None:
        ch = self.conn.channel()
        ch.basic_qos(prefetch_count=1)
        ch.add_on_cancel_callback(self._on_cancel)
        ch.basic_consume(self.queue, self._on_message)

    def _on_message(self, ch, method, props, body) -> None:
        self.got.append(body)
        ch.basic_ack(method.delivery_tag)

    def _on_cancel(self, frame) -> None:
        self.cancels += 1
        self.move = True

    def pump(self) -> None:
        self.conn.process_data_events(0.01)
        if self.move:   # declare and consume again on a new connection
            self.move = False
            self.close()
            self.conn = pika.BlockingConnection(pika.URLParameters(self.url))
            self.conn.channel().queue_declare(self.queue, durable=True, arguments=ARGS)
            self._consume()

    def close(self) -> None:
        try:
            self.conn.close()
        except pika.exceptions.AMQPError:
            pass


def pump(consumers, seconds: float, done) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done():
        for c in consumers:
            c.pump()


def one_run(cluster: Cluster, i: int) -> bool:
    queue = f"repro.{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(cluster.url("wqa")))
    ch = conn.channel()
    ch.queue_declare(queue, durable=True, arguments=ARGS)
    got: list = []
    consumers = [Consumer(cluster.url(n), queue, got) for n in NODES]
    pump(consumers, 0.5, lambda: False)
    cluster.ctl("wqa", "delete_queue", queue)
    ch.queue_declare(queue, durable=True, arguments=ARGS)   # the other client, at once
    for k in range(TASKS):
        ch.basic_publish("", queue, b"%d" % k, pika.BasicProperties(delivery_mode=2))
    pump(consumers, 5, lambda: len(got) >= TASKS)
    before = len(got)
    if before < TASKS:
        for c in consumers:
            c.move = True
        pump(consumers, 60, lambda: len(got) >= TASKS)
    m = ch.queue_declare(queue, passive=True).method
    if len(got) < TASKS:
        print(cluster.ctl("wqa", "list_queues", "name", "messages_ready",
                          "messages_unacknowledged", "consumers").stdout)
    print(f"run {i}: cancels {[c.cancels for c in consumers]}, delivered {before} before the "
          f"move and {len(got) - before} after, ready {m.message_count}, "
          f"consumers {m.consumer_count}", flush=True)
    for c in consumers:
        c.close()
    ch.queue_delete(queue)
    conn.close()
    return len(got) >= TASKS


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    cluster = Cluster()
    cluster.start()
    try:
        ok = sum(one_run(cluster, i) for i in range(runs))
    finally:
        cluster.teardown()
    print(f"{ok} of {runs} runs got every task")
    return 0 if ok == runs else 1


if __name__ == "__main__":
    sys.exit(main())
