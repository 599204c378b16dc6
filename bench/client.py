"""The producer's side: workqd.client's submit() latency, and what a delay costs.

    python bench/client.py [--tasks 5000] [--latency-tasks 2000] [--per-process 30]

- latency: ``Client.submit`` one task at a time from a warm client (p50, p99), beside
  ``workq-submit`` started once per task (what a web application forking the command
  pays), in the same run;
- delayed publish: ``submit_many`` of N tasks at once and with a 2 s delay, each
  timed until the broker confirmed the last, and the broker's CPU (beam.smp) per
  task until every task is in its work queue (the delayed ones after their trip
  through the levels).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import URL, Admin, _broker_pids, _proc_cpu, median, queue_name, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from workqd.client import Client   # noqa: E402  (the checkout's, not an installed one)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def latency(client: Client, admin: Admin, n: int, per_process: int) -> dict:
    q = queue_name("client-latency")
    admin.declare(q)
    try:
        warm = []
        client.submit(b"warm-up", queue=q)
        for i in range(n):
            t = time.perf_counter()
            client.submit(f"task {i}".encode(), queue=q)
            warm.append(time.perf_counter() - t)
        forked = []
        for i in range(per_process):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "workqd.submit", "--url", URL, "-q", q,
                            f"task {i}"], check=True, capture_output=True)
            forked.append(time.perf_counter() - t)
    finally:
        admin.delete(q)
    return {"submit_p50_ms": percentile(warm, 50) * 1000,
            "submit_p99_ms": percentile(warm, 99) * 1000,
            "workq_submit_per_task_p50_ms": median(forked) * 1000}


def broker_cpu() -> float:
    return sum(_proc_cpu(p) for p in _broker_pids())


def publish(client: Client, admin: Admin, n: int, delay: float | None) -> dict:
    q = queue_name("client-delay" if delay else "client-plain")
    admin.declare(q)
    try:
        bodies = [f"task {i}".encode() for i in range(n)]
        cpu0, t0 = broker_cpu(), time.perf_counter()
        client.submit_many(bodies, queue=q, delay=delay)
        confirmed = time.perf_counter() - t0
        wait_for(lambda: admin.depth(q) >= n, 120 + (delay or 0), what=f"{n} tasks in {q}")
        cpu = broker_cpu() - cpu0
    finally:
        admin.delete(q)
    return {"tasks_per_s": n / confirmed, "broker_cpu_us_per_task": cpu / n * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--latency-tasks", type=int, default=2000)
    ap.add_argument("--per-process", type=int, default=30)
    args = ap.parse_args()
    admin = Admin()
    client = Client(URL)
    try:
        out = {"latency": latency(client, admin, args.latency_tasks, args.per_process),
               "plain": publish(client, admin, args.tasks, None),
               "delayed_2s": publish(client, admin, args.tasks, 2.0)}
    finally:
        client.close()
        admin.close()
    out["delayed_vs_plain_throughput"] = (out["delayed_2s"]["tasks_per_s"]
                                          / out["plain"]["tasks_per_s"])
    out["delayed_vs_plain_broker_cpu"] = (out["delayed_2s"]["broker_cpu_us_per_task"]
                                          / out["plain"]["broker_cpu_us_per_task"])
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
