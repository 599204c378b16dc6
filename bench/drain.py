"""W1 drain: pre-publish N persistent no-op tasks, then time how fast a system empties the queue.

    python bench/drain.py [--tasks 20000] [--runs 3] [--prefetch 1 50] [--types classic quorum]
                          [--systems pika workqd] [--python VENV_PYTHON] [--others-python PY]

For each queue type and prefetch, every run drains a fresh queue with each
system in turn (the order alternates between runs) and reports tasks/s and the
ratio workqd / plain pika of that same run; the summary is the median of the
runs. The rate is tasks over the time from the first task's start to the last
task's end, both read from the stamp files the task leaves (see benchtasks.py),
so process start-up and connection set-up are not counted against anyone.
After every drain the system is stopped gracefully and the queue must hold
nothing: every task ran exactly once, none lost, none redelivered.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import (Admin, BenchError, CpuWatch, StampDir, bodies, fill, median, queue_name,
                    wait_for)
import systems as systems_mod


def drain_once(system: systems_mod.System, qtype: str, prefetch: int, n: int = 20000,
               workers: int = 2, size: int = 100, admin: Admin | None = None,
               task: str = "stamp") -> dict:
    """One drain of a fresh queue; returns the measurement (raises BenchError if invalid)."""
    own_admin = admin is None
    admin = admin or Admin()
    q = queue_name(f"w1.{system.name}.{qtype}")
    extra_queues, exchanges = system.leftovers(q)
    stamps = StampDir()
    procs = None
    try:
        admin.declare(q, system.queue_arguments(q, qtype))
        fill(q, system.messages(q, bodies(n, size), task), admin)
        watch = CpuWatch()
        procs = system.start(q, qtype, workers, prefetch, {"BENCH_STAMP_DIR": stamps.path},
                             task)

        def done():
            if not procs.alive():
                raise BenchError(f"{system.name} exited during the drain: {procs.last_line()}")
            return stamps.count() >= n
        wait_for(done, timeout=60 + n / 200, interval=0.01, what=f"{system.name} to run {n} tasks")
        calls, first, last = stamps.window()
        other = watch.other_load(procs.pids())
        procs.stop()
        procs = None
        remaining = admin.depth(q)
        result = {"system": system.name, "type": qtype, "prefetch": prefetch, "workers": workers,
                  "size": size, "tasks": n, "task": task, "calls": calls, "remaining": remaining,
                  "seconds": last - first, "rate": calls / (last - first) if last > first else 0.0,
                  "other_load": other}
        if calls != n or remaining != 0:
            raise BenchError(f"{system.name} {qtype} prefetch {prefetch}: ran {calls} of {n} "
                             f"tasks, {remaining} left in the queue")
        return result
    finally:
        if procs is not None:
            procs.stop()
        stamps.remove()
        admin.delete(q, *extra_queues)
        admin.delete_exchange(*exchanges)
        if own_admin:
            admin.close()


def w1(systems: list[systems_mod.System], types, prefetches, n: int, runs: int,
       workers: int = 2, size: int = 100, log=print, task: str = "stamp") -> list[dict]:
    """Every (type, prefetch) cell, ``runs`` times, each system once per run."""
    out = []
    admin = Admin()
    try:
        for qtype in types:
            for prefetch in prefetches:
                for run in range(runs):
                    order = systems if run % 2 == 0 else systems[::-1]
                    for system in order:
                        r = drain_once(system, qtype, prefetch, n, workers, size, admin, task)
                        r["run"] = run
                        out.append(r)
                        log(f"  W1 {qtype:7} prefetch {prefetch:3} run {run} "
                            f"{system.name:8} {r['rate']:8.0f} tasks/s")
    finally:
        admin.close()
    return out


def summarize(results: list[dict], baseline: str = "pika") -> list[dict]:
    """Median rate per (system, type, prefetch) and median of per-run ratios to ``baseline``."""
    cells: dict[tuple, dict] = {}
    for r in results:
        key = (r["system"], r["type"], r["prefetch"], r.get("pika", ""), r.get("task", "stamp"))
        cells.setdefault(key, []).append(r)
    by_run = {(r["system"], r["type"], r["prefetch"], r.get("pika", ""), r.get("task", "stamp"),
               r["run"]): r["rate"] for r in results}
    rows = []
    for (system, qtype, prefetch, pika_v, task), rs in cells.items():
        ratios = []
        for r in rs:
            base = by_run.get((baseline, qtype, prefetch, pika_v, task, r["run"]))
            if base:
                ratios.append(r["rate"] / base)
        rows.append({"system": system, "type": qtype, "prefetch": prefetch, "pika": pika_v,
                     "task": task,
                     "runs": len(rs), "rate": median(r["rate"] for r in rs),
                     "rates": [round(r["rate"]) for r in rs],
                     "ratio": median(ratios) if ratios else None})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--prefetch", type=int, nargs="+", default=[1, 50])
    p.add_argument("--types", nargs="+", default=["classic", "quorum"])
    p.add_argument("--systems", nargs="+", default=["pika", "workqd"])
    p.add_argument("--python", default=sys.executable,
                   help="Python of the venv that runs pika consumers and workqd")
    p.add_argument("--others-python", help="Python of the venv with Celery and Dramatiq")
    p.add_argument("--task", default="stamp", choices=("stamp", "cpu_1ms", "io_5ms"),
                   help="the task each message runs (benchtasks.py): the no-op stamp (W1), "
                   "1 ms of CPU or 5 ms of I/O wait (W5)")
    p.add_argument("--json", help="write the raw results here")
    a = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="workqd-bench-"))
    systems = [systems_mod.make(s, a.others_python if s in ("celery", "dramatiq") else a.python,
                                workdir) for s in a.systems]
    results = w1(systems, a.types, a.prefetch, a.tasks, a.runs, a.workers, a.size,
                 task=a.task)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(f"\ndrain of {a.task} tasks, {a.tasks} of {a.size} B, {a.workers} worker processes, "
          f"median of {a.runs} runs (logs in {workdir})")
    print(f"{'system':9} {'type':8} {'prefetch':>8} {'tasks/s':>9} {'vs pika':>8}  runs")
    for row in summarize(results):
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        print(f"{row['system']:9} {row['type']:8} {row['prefetch']:>8} {row['rate']:>9.0f} "
              f"{ratio:>8}  {row['rates']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
