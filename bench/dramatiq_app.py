"""Dramatiq as the W1 comparison runs it: RabbitmqBroker, default middleware.

The queue comes from $BENCH_QUEUE; for a quorum queue ($BENCH_QTYPE=quorum) the
broker adds ``x-queue-type`` to the arguments it declares with (Dramatiq itself
declares classic queues only).
"""

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

import benchtasks

QUEUE = os.environ.get("BENCH_QUEUE", "bench.dramatiq")
QTYPE = os.environ.get("BENCH_QTYPE", "classic")


class Broker(RabbitmqBroker):
    def _build_queue_arguments(self, queue_name):
        args = super()._build_queue_arguments(queue_name)
        if QTYPE == "quorum":
            args["x-queue-type"] = "quorum"
        return args


dramatiq.set_broker(Broker(url=os.environ.get("BENCH_AMQP_URL",
                                              "amqp://guest:guest@127.0.0.1:5672/%2F")))


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def stamp(payload):
    benchtasks.stamp(payload.encode())


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def sleep_ms(payload):
    benchtasks.sleep_ms(payload.encode())


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def cpu_1ms(payload):
    benchtasks.cpu_1ms(payload.encode())


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def io_5ms(payload):
    benchtasks.io_5ms(payload.encode())
