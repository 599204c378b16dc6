"""One daemon with many queues: how fast it starts, and what the master costs idle and asked.

    bench/.venv-bench/bin/python bench/scale.py [--python VENV/bin/python]
        [--queues 50] [--workers 2] [--runs 1] [--idle 10] [--requests 50]
        [--variant LABEL=ROOT ...] [--out FILE]

Starts a real workqd (from this checkout, or from each ``--variant`` checkout:
the directory holding workqd/) with QUEUES queues of WORKERS workers each
against the local RabbitMQ, every queue declared beforehand as in production,
and measures:

- start to ready: the master's own log line "ready: every worker is consuming
  (X s after start)", and the wall time from spawning the process until the
  bench read that line; and the CPU seconds spent meanwhile by the master, its
  workers, its queue poller, the broker, and the whole machine (all cores);
- the master's CPU over an idle window (``--idle`` seconds, after 2 s to let
  the first polls pass), in % of one core, from /proc/PID/stat;
- ``--requests`` scrapes of /metrics over HTTP, one connection each: median
  and p95 of the wall time from connect to the last byte, in ms;
- as many ``status`` requests on the control socket, one connection each as
  workqctl makes them (the raw protocol of control.py): median and p95 of
  connect to the answer's newline, in ms; and the master's CPU per request of
  each kind.

Prints one JSON object (every run, and the medians per variant) and a one-line
summary per variant; with several variants, the runs alternate their order.
Deletes every queue it declared, also when a run fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

import yaml

import common
from common import (Admin, BenchError, Workqd, _broker_pids, _busy_seconds, _proc_cpu, median,
                    queue_name, wait_for)

READY_LINE = re.compile(r"ready: every worker is consuming \(([0-9.]+)s after start\)")
SETTLE = 2.0   # seconds after ready before the idle window: the first depth polls land


def p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))] if values else float("nan")


def scrape(port: int) -> tuple[float, int]:
    """One GET /metrics: (wall seconds, body bytes)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise BenchError(f"/metrics answered {r.status}")
    finally:
        conn.close()
    return time.perf_counter() - t0, len(body)


def status(path: str) -> tuple[float, dict]:
    """One `status` request on its own connection: (wall seconds, the answer)."""
    t0 = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b'{"v": 1, "cmd": "status"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                raise BenchError("the control socket closed before answering")
            buf += chunk
    elapsed = time.perf_counter() - t0
    answer = json.loads(buf)
    if not answer.get("ok"):
        raise BenchError(f"status answered {answer}")
    return elapsed, answer


def run_once(python: str, workdir: Path, root: str, queues: int, workers: int,
             idle: float, requests: int, admin: Admin) -> dict:
    names = [queue_name("scale") for _ in range(queues)]
    common.WORKQD_ROOT = root   # venv_env() puts it on the daemon's PYTHONPATH
    d = Workqd(python, workdir, [Workqd.queue(n, "classic", workers, 1) for n in names],
               env={"BENCH_STAMP_DIR": "/nonexistent"}, log_level="info")
    sock = str(workdir / f"control-{d.port}.sock")
    d.config["control"] = {"socket": sock}
    d.path.write_text(yaml.safe_dump(d.config, sort_keys=False))
    try:
        for n in names:
            admin.declare(n, {"x-queue-type": "classic"})
        broker = _broker_pids()
        broker0, busy0 = sum(map(_proc_cpu, broker)), _busy_seconds()
        d.start()

        def ready():
            if not d.alive():
                raise BenchError(f"workqd exited: {d.last_line()}")
            m = READY_LINE.search(d.procs.log_path.read_text(errors="replace"))
            return m and float(m.group(1))
        ready_s = wait_for(ready, 120, 0.01, "the ready log line")
        ready_wall = time.monotonic() - d.started
        # Where the CPU went from the spawn to ready: start-up is CPU-bound on a small
        # machine, so these say what there is to gain, and how much others took.
        workers_ = d.worker_pids()
        tree = d.pids()
        start_cpu = {"master": _proc_cpu(d.pid), "workers": sum(map(_proc_cpu, workers_)),
                     "poller": sum(_proc_cpu(p) for p in tree
                                   if p != d.pid and p not in workers_),
                     "broker": sum(map(_proc_cpu, broker)) - broker0,
                     "machine": _busy_seconds() - busy0}
        time.sleep(SETTLE)
        cpu0, t0 = _proc_cpu(d.pid), time.monotonic()
        time.sleep(idle)
        idle_pct = (_proc_cpu(d.pid) - cpu0) / (time.monotonic() - t0) * 100

        scrape(d.port)   # the first of each kind may warm caches: not counted
        cpu0 = _proc_cpu(d.pid)
        scrapes = [scrape(d.port) for _ in range(requests)]
        scrape_cpu = (_proc_cpu(d.pid) - cpu0) / requests
        status(sock)
        cpu0 = _proc_cpu(d.pid)
        answers = [status(sock) for _ in range(requests)]
        status_cpu = (_proc_cpu(d.pid) - cpu0) / requests
        shown = sum(len(q["workers"]) for q in answers[-1][1]["queues"])
        if shown != queues * workers:
            raise BenchError(f"status shows {shown} workers, not {queues * workers}")
        scrape_ms = [s * 1000 for s, _ in scrapes]
        status_ms = [s * 1000 for s, _ in answers]
        return {"queues": queues, "workers": workers, "ready_s": ready_s,
                "ready_wall_s": ready_wall, "start_cpu_s": start_cpu, "idle_cpu_pct": idle_pct,
                "scrape_ms_median": median(scrape_ms), "scrape_ms_p95": p95(scrape_ms),
                "scrape_bytes": scrapes[-1][1], "scrape_cpu_ms": scrape_cpu * 1000,
                "status_ms_median": median(status_ms), "status_ms_p95": p95(status_ms),
                "status_cpu_ms": status_cpu * 1000}
    finally:
        d.stop()
        sweep_names(admin, names)


def sweep_names(admin: Admin, names: list[str]) -> None:
    for n in names:
        admin.delete(n, f"{n}.dead")
        common.CREATED.remove(n)


KEYS = ("ready_s", "ready_wall_s", "idle_cpu_pct", "scrape_ms_median", "scrape_ms_p95",
        "scrape_cpu_ms", "status_ms_median", "status_ms_p95", "status_cpu_ms")


def summarize(runs: list[dict]) -> dict:
    return {k: median(r[k] for r in runs) for k in KEYS}


def line(label: str, s: dict, queues: int, workers: int) -> str:
    return (f"{label}: {queues}x{workers} ready {s['ready_s']:.2f}s (wall {s['ready_wall_s']:.2f}s)"
            f", idle master {s['idle_cpu_pct']:.2f}% of a core, /metrics "
            f"{s['scrape_ms_median']:.1f} ms (p95 {s['scrape_ms_p95']:.1f}, "
            f"{s['scrape_cpu_ms']:.1f} ms CPU), status {s['status_ms_median']:.1f} ms "
            f"(p95 {s['status_ms_p95']:.1f}, {s['status_cpu_ms']:.1f} ms CPU)")


def measure(python: str, variants: dict[str, str], queues: int = 50, workers: int = 2,
            runs: int = 1, idle: float = 10.0, requests: int = 50, log=print) -> dict:
    """Every run of every variant, and their medians: what suite.py records."""
    workdir = Path(tempfile.mkdtemp(prefix="workqd-scale-"))
    admin = Admin()
    out: dict = {"queues": queues, "workers": workers, "idle_s": idle, "requests": requests,
                 "runs": [], "median": {}}
    try:
        labels = list(variants)
        for run in range(runs):
            for label in (labels if run % 2 == 0 else labels[::-1]):
                r = run_once(python, workdir, variants[label], queues, workers, idle,
                             requests, admin)
                r.update(variant=label, run=run)
                out["runs"].append(r)
                log(line(f"run {run} {label}", r, queues, workers))
        for label in labels:
            out["median"][label] = summarize([r for r in out["runs"] if r["variant"] == label])
    finally:
        admin.close()   # each run deleted its own queues
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--python", default=sys.executable, help="the venv's python to run workqd")
    p.add_argument("--queues", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--idle", type=float, default=10.0, help="idle CPU window, seconds")
    p.add_argument("--requests", type=int, default=50, help="scrapes and status requests")
    p.add_argument("--variant", action="append", metavar="LABEL=ROOT",
                   help="a checkout to measure (default: this one); repeat to compare")
    p.add_argument("--out", help="write the JSON here too")
    a = p.parse_args()
    variants = {}
    for v in a.variant or [f"this={common.WORKQD_ROOT}"]:
        label, _, root = v.partition("=")
        variants[label] = str(Path(root).resolve())
    result = measure(a.python, variants, a.queues, a.workers, a.runs, a.idle, a.requests,
                     log=lambda text: print(text, file=sys.stderr, flush=True))
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    for label, s in result["median"].items():
        print(line(f"median of {a.runs} {label}", s, a.queues, a.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
