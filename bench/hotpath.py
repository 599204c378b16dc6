"""The worker's own Python per task, in process: no broker, one thread at a time.

    python bench/hotpath.py ROOT [ROOT ...]     # checkouts: the directory holding workqd/
    taskset -c 1 python bench/hotpath.py ...    # steadier, on one core

Two figures per ROOT, in microseconds per task, best of 3 rounds of 100,000:
- I/O thread: the worker's delivery callback, then its settle path, for successes,
  with a fake channel and I/O loop (pika's frame handling is left out);
- handler thread: the handler loop over deliveries queued up front, with a no-op
  handler (the hand-back through the deque is counted, the I/O thread's wake-up not).
Each ROOT runs in a fresh interpreter. Knows the worker of 884a362
(workqd/worker.py) and the worker package that replaced it.

2026-12-04, pika 1.2.0, Python 3.11.7, one core: 884a362 I/O 1.30-1.35 us, handler
0.53-0.57 us; the worker package 1.45-1.52 us and 0.62-0.65 us.
"""

from __future__ import annotations

import os
import subprocess
import sys

TASKS = 100_000

PROBE = r"""
import os, sys, time, types
import pika
from workqd import config
from workqd.slots import SlotTable

cfg = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"}, "prefetch": 50}]},
                   "hotpath.yaml")
queue = cfg.queues[0]


class Channel:
    is_open = True

    def basic_ack(self, tag, multiple=False):
        pass


class Loop:
    def call_later(self, delay, callback):
        return object()

    def remove_timeout(self, timer):
        pass


props = pika.BasicProperties(delivery_mode=2, message_id="m-123456")
body = b"x" * 100
method = types.SimpleNamespace(redelivered=False, delivery_tag=0, routing_key="q", exchange="")
slot = SlotTable(capacity=2).allocate(1)
_, wake = os.pipe()
if os.path.exists(os.path.join(sys.argv[1], "workqd", "worker.py")):   # before the redesign
    from workqd.worker import Worker
    worker = Worker(1, queue, cfg.broker, slot, wake, "info")
    channel = Channel()
    worker._channel, worker._ioloop = channel, Loop()

    def one(tag):
        method.delivery_tag = tag
        worker._on_message(channel, method, props, body)
        d = worker._tasks.get_nowait()
        d.started = time.monotonic()
        worker._on_task_done(d)
else:
    import queue as queue_mod
    from workqd.worker.process import Worker
    from workqd.worker.settle import Settler
    worker = Worker(1, queue, cfg.broker, slot, wake, "info")
    worker.pid = os.getpid()
    tasks = queue_mod.SimpleQueue()
    worker._handler = types.SimpleNamespace(submit=tasks.put, idle=tasks.empty)
    channel = Channel()
    session = types.SimpleNamespace(channel=channel, settler=Settler(
        channel, Loop(), worker._ack_batch, tasks.empty, worker, None))
    worker._session = session

    def one(tag):
        method.delivery_tag = tag
        worker._on_message(channel, method, props, body)
        d = tasks.get_nowait()
        d.ran_for = 0.001   # the handler thread's result (a success is the default)
        worker._on_result(d)

best = None
for _ in range(3):
    t0 = time.perf_counter()
    for tag in range(int(sys.argv[2])):
        one(tag)
    took = (time.perf_counter() - t0) / int(sys.argv[2]) * 1e6
    best = took if best is None else min(best, took)

# The handler thread's loop: N deliveries queued up front, a no-op handler that
# sets an event after the last; the I/O thread meanwhile waits on that event.
import collections, queue as queue_mod, threading
n = int(sys.argv[2])


def deliveries():
    if hasattr(worker, "_tasks"):   # 884a362: a thread of an earlier round still reads _tasks
        worker._tasks = queue_mod.SimpleQueue()
    out = []
    for tag in range(n):
        method.delivery_tag = tag
        out.append(make(tag))
    return out


def timed(start, tasks, results):
    count = [0]
    done = threading.Event()

    def run(body, task):
        count[0] += 1
        if count[0] == n:
            done.set()
    t0 = time.perf_counter()
    start(run, tasks)
    if not done.wait(60):
        raise SystemExit("the handler loop did not finish")
    took = (time.perf_counter() - t0) / n * 1e6
    while len(results()) < n:   # the last append follows the last call
        time.sleep(0.001)
    return took


if os.path.exists(os.path.join(sys.argv[1], "workqd", "worker.py")):
    def make(tag):
        worker._on_message(channel, method, props, body)
        return worker._tasks.get_nowait()

    def start(run, ds):
        worker._handler = run
        worker._tasks = queue_mod.SimpleQueue()
        worker._done = collections.deque()
        worker._done_fd = os.eventfd(0, os.EFD_NONBLOCK)
        worker._wake_armed = False
        for d in ds:
            worker._tasks.put(d)
        threading.Thread(target=worker._handler_loop, daemon=True).start()
    results = lambda: worker._done
else:
    from workqd.worker.handler import HandlerThread

    def make(tag):
        worker._on_message(channel, method, props, body)
        return tasks.get_nowait()
    box = {}

    def start(run, ds):
        h = box["h"] = HandlerThread(run, slot, 30.0)
        for d in ds:
            h.submit(d)
        h.start()
    results = lambda: box["h"].results
hbest = min(timed(start, deliveries(), results) for _ in range(3))
print(f"{sys.argv[1]}: I/O thread {best:.2f} us, handler thread {hbest:.2f} us per task "
      f"(best of 3)")
"""


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    for root in sys.argv[1:]:
        root = os.path.abspath(root)
        env = {**os.environ, "PYTHONPATH": root}
        if subprocess.run([sys.executable, "-c", PROBE, root, str(TASKS)], env=env,
                          cwd="/").returncode:
            print(f"{root}: the probe failed", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
