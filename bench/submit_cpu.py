"""W4's CPU side: CPU seconds per task of workq-submit --file and of plain pika pipelined.

    python bench/submit_cpu.py [--tasks 20000] [--runs 5] [--baseline-tree DIR]

Wall-clock rates on a shared machine wander with the broker's fsyncs and other
sessions' load; the CPU a publisher process spends (user + system, start-up
included) per task does not, so it shows what a change to the per-task path did.
Each publisher runs as a whole process, in alternating order, into a fresh durable
classic queue; a run the broker cut short (a forced close) is done again.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pika

from common import BENCH, URL, WORKQD_ROOT
from publish import task_file


def cpu_run(argv: list[str], tree: str, queue: str, n: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one publisher run that put all n tasks in queue."""
    for attempt in range(5):
        q = f"{queue}.{attempt}"
        _admin(lambda ch: ch.queue_declare(q, durable=True, arguments={"x-queue-type": "classic"}))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        r = subprocess.run([q if a == "{queue}" else a for a in argv], capture_output=True,
                           env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH), tree])),
                           timeout=300)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        depth = _admin(lambda ch: ch.queue_declare(q, passive=True).method.message_count)
        _admin(lambda ch: ch.queue_delete(q))
        if r.returncode == 0 and depth == n:
            return (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime), wall
        print(f"  again: exit {r.returncode}, {depth} of {n} queued", file=sys.stderr)
    raise SystemExit(f"{argv[:3]} failed five times")


def _admin(fn):
    for _ in range(10):
        try:
            conn = pika.BlockingConnection(pika.URLParameters(URL))
        except pika.exceptions.AMQPError:
            time.sleep(2)
            continue
        try:
            return fn(conn.channel())
        finally:
            if conn.is_open:
                conn.close()
    raise SystemExit("no broker")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--baseline-tree", metavar="DIR")
    a = p.parse_args()
    path = str(task_file(Path(tempfile.mkdtemp(prefix="workqd-bench-")), a.tasks))
    submit = [a.python, "-m", "workqd.submit", "--url", URL, "-q", "{queue}", "--file", path]
    kinds = {"workq-submit": (submit, WORKQD_ROOT),
             "pika-pipelined": ([a.python, str(BENCH / "pika_publish.py"), "--url", URL,
                                 "--queue", "{queue}", "--file", path, "--mode", "pipelined"],
                                WORKQD_ROOT)}
    if a.baseline_tree:
        kinds["workq-submit@baseline"] = (submit, str(Path(a.baseline_tree).resolve()))
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    for run in range(a.runs):
        order = list(kinds) if run % 2 == 0 else list(kinds)[::-1]
        for k in order:
            c, w = cpu_run(kinds[k][0], kinds[k][1], f"bench.cpu.{os.getpid()}.{run}", a.tasks)
            cpu[k].append(c)
            wall[k].append(w)
    base = statistics.median(cpu["pika-pipelined"])
    print(f"\nW4 CPU, {a.tasks} tasks of ~100 B, whole process, median of {a.runs} runs")
    print(f"{'publisher':22} {'CPU/task':>9} {'vs pika':>8} {'tasks/s':>8} {'wall vs pika':>13}")
    for k in kinds:
        ratios = [wall["pika-pipelined"][i] / wall[k][i] for i in range(a.runs)]
        print(f"{k:22} {1e6 * statistics.median(cpu[k]) / a.tasks:7.1f}us "
              f"{base / statistics.median(cpu[k]):7.2f}x "
              f"{a.tasks / statistics.median(wall[k]):8.0f} {statistics.median(ratios):12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
