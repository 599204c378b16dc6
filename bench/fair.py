"""W2 fair dispatch: a seeded mix of short and long sleeps over 4 workers at prefetch 1.

The tasks are published only once every worker consumes, so the makespan
(first task's start to last task's end, from the task log) measures dispatch,
not start-up. It is compared with the ideal lower bound ``max(sum/4, longest)``
and with the zero-overhead greedy schedule of the same task order: each task,
in queue order, goes to the worker that becomes free first. That greedy
schedule is what prefetch 1 can at best achieve.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import tempfile
from pathlib import Path

from common import Admin, BenchError, queue_name, wait_for
import systems as systems_mod

SHORT_MS, LONG_MS, LONG_SHARE = 20, 400, 0.2


def task_mix(n: int = 120, seed: int = 6) -> list[int]:
    rng = random.Random(seed)
    return [LONG_MS if rng.random() < LONG_SHARE else SHORT_MS for _ in range(n)]


def lower_bound(durations: list[float], workers: int) -> float:
    return max(sum(durations) / workers, max(durations))


def greedy_makespan(durations: list[float], workers: int) -> float:
    free = [0.0] * workers
    for d in durations:
        t = heapq.heappop(free)
        heapq.heappush(free, t + d)
    return max(free)


def read_log(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fair_once(system: systems_mod.System, qtype: str = "classic", workers: int = 4,
              n: int = 120, seed: int = 6, admin: Admin | None = None) -> dict:
    own = admin is None
    admin = admin or Admin()
    q = queue_name(f"w2.{system.name}")
    extra_queues, exchanges = system.leftovers(q)
    fd, log_path = tempfile.mkstemp(prefix="workqd-bench-w2-", suffix=".jsonl")
    os.close(fd)
    os.unlink(log_path)
    procs = None
    ms = task_mix(n, seed)
    try:
        admin.declare(q, system.queue_arguments(q, qtype))
        procs = system.start(q, qtype, workers, 1, {"BENCH_LOG": log_path}, task="sleep_ms")
        expected = 1 if system.name == systems_mod.CELERY else workers

        def consuming():
            if not procs.alive():
                raise BenchError(f"{system.name} exited: {procs.last_line()}")
            return admin.consumers(q) >= expected
        wait_for(consuming, 60, 0.01, f"{expected} consumers on {q}")
        payloads = [f"t{i:04d} {m}".encode() for i, m in enumerate(ms)]
        from pika_publish import publish_pipelined
        from common import URL
        publish_pipelined(URL, q, system.messages(q, payloads, task="sleep_ms"), window=1000)

        def finished():
            if not procs.alive():
                raise BenchError(f"{system.name} exited: {procs.last_line()}")
            return sum(1 for e in read_log(log_path) if e["e"] == "end") >= n
        wait_for(finished, 60 + sum(ms) / 1000, 0.02, f"{n} tasks to end")
        events = read_log(log_path)
        starts = [e["t"] for e in events if e["e"] == "start"]
        ends = [e["t"] for e in events if e["e"] == "end"]
        makespan = max(ends) - min(starts)
        secs = [m / 1000 for m in ms]
        lb, greedy = lower_bound(secs, workers), greedy_makespan(secs, workers)
        ids = [e["id"] for e in events if e["e"] == "end"]
        if len(ids) != n or len(set(ids)) != n:
            raise BenchError(f"W2 {system.name}: {len(ids)} ends for {len(set(ids))} tasks")
        return {"system": system.name, "type": qtype, "workers": workers, "tasks": n,
                "makespan": makespan, "lower_bound": lb, "greedy": greedy,
                "vs_lower_bound": makespan / lb, "vs_greedy": makespan / greedy,
                "greedy_vs_lower_bound": greedy / lb}
    finally:
        if procs is not None:
            procs.stop()
        if os.path.exists(log_path):
            os.unlink(log_path)
        admin.delete(q, *extra_queues)
        admin.delete_exchange(*exchanges)
        if own:
            admin.close()


def w2(systems, runs: int = 3, qtype: str = "classic", log=print) -> list[dict]:
    out = []
    admin = Admin()
    try:
        for run in range(runs):
            for system in (systems if run % 2 == 0 else systems[::-1]):
                r = fair_once(system, qtype, admin=admin)
                r["run"] = run
                out.append(r)
                log(f"  W2 run {run} {system.name:8} makespan {r['makespan']:.3f}s = "
                    f"{r['vs_lower_bound']:.3f} x lower bound, {r['vs_greedy']:.3f} x greedy")
    finally:
        admin.close()
    return out


if __name__ == "__main__":
    import argparse
    import sys
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--systems", nargs="+", default=["pika", "workqd"])
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--others-python")
    a = p.parse_args()
    wd = Path(tempfile.mkdtemp(prefix="workqd-bench-"))
    w2([systems_mod.make(s, a.others_python if s in ("celery", "dramatiq") else a.python, wd)
        for s in a.systems], a.runs)
