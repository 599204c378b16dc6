"""Celery as the W1 comparison runs it: prefork, acks_late, prefetch multiplier from the CLI.

The queue comes from $BENCH_QUEUE (and its type from $BENCH_QTYPE), declared on
the default exchange's routing as the bench pre-fills it.
"""

import os

from celery import Celery
from kombu import Exchange, Queue

import benchtasks

QUEUE = os.environ.get("BENCH_QUEUE", "bench.celery")
QTYPE = os.environ.get("BENCH_QTYPE", "classic")

app = Celery("bench", broker=os.environ.get("BENCH_AMQP_URL",
                                            "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_queues=[Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE,
                       queue_arguments={"x-queue-type": "quorum"} if QTYPE == "quorum" else None)],
    task_default_queue=QUEUE,
)


@app.task(name="bench.stamp")
def stamp(payload):
    benchtasks.stamp(payload.encode())


@app.task(name="bench.sleep_ms")
def sleep_ms(payload):
    benchtasks.sleep_ms(payload.encode())


@app.task(name="bench.cpu_1ms")
def cpu_1ms(payload):
    benchtasks.cpu_1ms(payload.encode())


@app.task(name="bench.io_5ms")
def io_5ms(payload):
    benchtasks.io_5ms(payload.encode())
