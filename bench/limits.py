"""Cluster-wide limits (limits.concurrency, limits.rate) measured from the tasks' own log.

Three runs, each with daemons on the machine's broker, and one cost comparison:

- ``cap``: a concurrency cap over several daemons; the most runs open at once and the
  throughput, from the start/end lines ``benchtasks.sleep_ms`` writes.
- ``cap --kill``: the same, with the daemon that holds a slot killed -9 mid-run (its
  whole process group); the most at once, and how long until the cap is full again.
- ``rate``: a rate over several daemons; task starts in every 10 s window.
- ``cost``: no-op tasks through one daemon with no limit, a cap as large as the pool
  (never waited for) and a rate far above what the pool can do (never waited for):
  what each limit costs a task, as a throughput ratio in the same run.

    python bench/limits.py cap  [--daemons 3 --workers 4 --cap 3 --tasks 300 --sleep 0.2]
    python bench/limits.py cap --kill
    python bench/limits.py rate [--daemons 3 --workers 4 --rate 20 --tasks 600]
    python bench/limits.py cost [--tasks 3000 --runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import (URL, Admin, BenchError, Workqd, median, persistent,  # noqa: E402
                    process_tree, python_of, queue_name, sweep, wait_for)
from pika_publish import publish_pipelined  # noqa: E402
from workqd import limits  # noqa: E402

import benchtasks  # noqa: E402


def start_daemons(python, workdir, n, queue, env, heartbeat: int | None = None) -> list[Workqd]:
    ds = []
    for _ in range(n):
        d = Workqd(python, workdir, [queue], env)
        if heartbeat is not None:
            d.config["broker"]["heartbeat"] = heartbeat
            d.path.write_text(yaml.safe_dump(d.config, sort_keys=False))
        ds.append(d.start())
    for d in ds:
        d.wait_ready(60)
    return ds


def stop_all(ds) -> None:
    for d in ds:
        if d.procs is not None:
            d.procs.stop()


def publish(admin: Admin, queue: str, bodies: list[bytes]) -> None:
    """Publish with pipelined confirms; the daemons consume as they land."""
    acked = publish_pipelined(URL, queue, [(b, persistent()) for b in bodies], window=2000)
    if acked != len(bodies):
        raise BenchError(f"publish to {queue}: {acked} of {len(bodies)} confirmed")


def read_log_lines(path: Path) -> list[dict]:
    """The task log's complete lines (one may be half-written while tasks run)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line]


def runs_of(lines: list[dict]) -> dict[tuple[str, int], list[float]]:
    out: dict[tuple[str, int], list[float]] = {}
    for e in lines:
        out.setdefault((e["id"], e["pid"]), []).append(e["t"])
    return out


def cap_run(args, python, workdir, admin) -> dict:
    q = queue_name("cap")
    log = workdir / f"{q}.log"
    env = {"BENCH_LOG": str(log)}
    queue = Workqd.queue(q, "quorum", args.workers, 1, "benchtasks:sleep_ms",
                         limits={"concurrency": args.cap})
    ds = start_daemons(python, workdir, args.daemons, queue, env, args.heartbeat)
    killed_at = None
    killed_pids: set[int] = set()
    try:
        publish(admin, q, [f"t{i} {args.sleep * 1000:g}".encode() for i in range(args.tasks)])
        if args.kill or args.freeze:
            wait_for(lambda: sum(1 for e in read_log_lines(log) if e["e"] == "start")
                     >= args.tasks // 3, 120, 0.02, "a third of the tasks started")
            holder = next(d for d in ds if d.metrics().get(
                f'workqd_limit_slots_held{{queue="{q}"}}', 0) > 0)
            killed_pids = set(process_tree(holder.pid))
            # SIGSTOP: a host that vanished without closing its sockets (power cut, lost
            # network); only the broker's heartbeat check notices it.
            os.killpg(holder.pid, signal.SIGKILL if args.kill else signal.SIGSTOP)
            killed_at = time.monotonic()
        ended = lambda: len({e["id"] for e in read_log_lines(log) if e["e"] == "end"})  # noqa
        wait_for(lambda: ended() >= args.tasks, 600, 0.1, "every task ended")
    finally:
        if args.freeze and killed_pids:
            os.killpg(holder.pid, signal.SIGKILL)   # never thawed: its tasks ran elsewhere
        stop_all(ds)
    lines = read_log_lines(log)
    spans = []
    for (tid, pid), ts in runs_of(lines).items():
        if len(ts) >= 2:
            spans.append((ts[0], ts[1]))
        elif pid in killed_pids:
            spans.append((ts[0], killed_at))   # cut by the kill
    starts = [e["t"] for e in lines if e["e"] == "start"]
    ends = [e["t"] for e in lines if e["e"] == "end"]
    out = {"run": "cap-kill" if args.kill else "cap-freeze" if args.freeze else "cap",
           "daemons": args.daemons, "heartbeat": args.heartbeat,
           "workers_each": args.workers, "cap": args.cap, "tasks": args.tasks,
           "task_seconds": args.sleep, "max_running": limits.max_concurrent(spans),
           "seconds": round(max(ends) - min(starts), 2),
           "tasks_per_second": round(args.tasks / (max(ends) - min(starts)), 2)}
    if killed_at is not None:
        live = [s for s in spans if s[1] != killed_at]
        full = limits.first_reaching(live, args.cap, killed_at)
        out["back_to_cap_after_kill_s"] = None if full is None else round(full - killed_at, 2)
    admin.delete(q, f"{q}.dead")
    return out


def rate_run(args, python, workdir, admin) -> dict:
    q = queue_name("rate")
    log = workdir / f"{q}.log"
    env = {"BENCH_LOG": str(log)}
    queue = Workqd.queue(q, "quorum", args.workers, 1, "benchtasks:sleep_ms",
                         limits={"rate": f"{args.rate:g}/s", "burst": args.burst})
    ds = start_daemons(python, workdir, args.daemons, queue, env)
    try:
        publish(admin, q, [f"t{i} 0".encode() for i in range(args.tasks)])
        ended = lambda: len({e["id"] for e in read_log_lines(log) if e["e"] == "end"})  # noqa
        wait_for(lambda: ended() >= args.tasks, args.tasks / args.rate * 3 + 60, 0.1,
                 "every task ended")
    finally:
        stop_all(ds)
    lines = read_log_lines(log)
    starts = sorted(e["t"] for e in lines if e["e"] == "start")
    by_pid = {}
    for e in lines:
        if e["e"] == "start":
            by_pid[e["pid"]] = by_pid.get(e["pid"], 0) + 1
    aligned = [sum(1 for t in starts if starts[0] + k * 10 <= t < starts[0] + (k + 1) * 10)
               for k in range(int((starts[-1] - starts[0]) // 10))]
    admin.delete(q, f"{q}.dead", limits.token_queue(q, f"{args.rate:g}/s", args.burst))
    return {"run": "rate", "daemons": args.daemons, "workers_each": args.workers,
            "rate_per_s": args.rate, "burst": args.burst, "tasks": args.tasks,
            "seconds": round(starts[-1] - starts[0], 2),
            "starts_per_s": round((len(starts) - 1) / (starts[-1] - starts[0]), 2),
            "max_starts_any_10s": limits.max_in_window(starts, 10.0),
            "min_starts_any_10s": limits.min_in_window(starts, 10.0),
            "bound_any_10s": limits.window_bound(args.rate, args.burst, 10.0),
            "starts_per_aligned_10s": aligned,
            "starts_per_worker_min_max": [min(by_pid.values()), max(by_pid.values())],
            "workers_that_started_tasks": len(by_pid)}


WARM_UP = 3000   # tasks drained before a cost run is timed


def cost_run(args, python, workdir, admin) -> dict:
    """No-op tasks through one daemon (4 workers, prefetch 1): none, cap, rate."""
    modes = {"none": None, "cap": {"concurrency": 4},
             "rate": {"rate": "5000/s", "burst": 1000}}
    results: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.runs):
        for mode, lim in modes.items():
            q = queue_name(f"cost-{mode}")
            stamps = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            extra = {"limits": lim} if lim else {}
            queue = Workqd.queue(q, "quorum", 4, 1, "benchtasks:stamp", **extra)
            ds = start_daemons(python, workdir, 1, queue, {"BENCH_STAMP_DIR": stamps})
            try:
                def count():
                    return sum(c for _, c, _, _ in benchtasks.read_stamps(stamps))
                # A warm-up drain first, then the stamps zeroed: start-up (slots taken,
                # the delay levels declared after consuming) stays out of every mode.
                publish(admin, q, [b"x"] * WARM_UP)
                wait_for(lambda: count() >= WARM_UP, 120, 0.05, f"{mode}: the warm-up ran")
                for name in os.listdir(stamps):
                    with open(os.path.join(stamps, name), "r+b") as f:
                        f.write(bytes(24))
                publish(admin, q, [b"x"] * args.tasks)
                wait_for(lambda: count() >= args.tasks, 600, 0.05, f"{mode}: every task ran")
                got = benchtasks.read_stamps(stamps)
                first = min(f for _, _, f, _ in got)
                last = max(x for _, _, _, x in got)
                results[mode].append(args.tasks / (last - first))
            finally:
                stop_all(ds)
            admin.delete(q, f"{q}.dead")
            if mode == "rate":
                admin.delete(limits.token_queue(q, "5000/s", 1000))
    base = median(results["none"])
    return {"run": "cost", "tasks": args.tasks, "runs": args.runs, "workers": 4,
            "tasks_per_second": {m: round(median(v), 1) for m, v in results.items()},
            "ratio_to_none": {m: round(median(v) / base, 3) for m, v in results.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", choices=("cap", "rate", "cost"))
    p.add_argument("--venv", default=None, help="venv whose Python runs workqd")
    p.add_argument("--daemons", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--cap", type=int, default=3)
    p.add_argument("--tasks", type=int, default=None)
    p.add_argument("--sleep", type=float, default=0.2)
    p.add_argument("--kill", action="store_true", help="kill -9 a slot holder's daemon mid-run")
    p.add_argument("--freeze", action="store_true",
                   help="SIGSTOP a slot holder's daemon mid-run (a lost host)")
    p.add_argument("--heartbeat", type=int, default=10, help="broker.heartbeat of the daemons")
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--burst", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    if args.tasks is None:
        args.tasks = {"cap": 300, "rate": 600, "cost": 3000}[args.run]
    python = python_of(args.venv)
    admin = Admin()
    workdir = Path(tempfile.mkdtemp(prefix="workqd-bench-limits-"))
    try:
        run = {"cap": cap_run, "rate": rate_run, "cost": cost_run}[args.run]
        print(json.dumps(run(args, python, workdir, admin), indent=1))
    except BenchError as e:
        print(f"bench/limits.py: {e}", file=sys.stderr)
        return 1
    finally:
        sweep(admin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
