"""The whole benchmark suite, in one process: ``bash bench/run.sh`` runs it.

    python bench/suite.py --py12 VENV/bin/python --pynew VENV/bin/python
                          [--others VENV/bin/python] [--smoke] [--out bench/out/results.json]

``--py12`` is a venv with bookworm's pika 1.2.0 (and the bench's own tools),
``--pynew`` one with the current pika from PyPI, ``--others`` one with Celery
and Dramatiq. Results go to a JSON file that ``report.py`` turns into
RESULTS.md and the chart. A run that fails (for instance because someone
restarted the shared broker under it) is retried up to twice and the retry is
recorded; the suite then goes on with the next measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pika.exceptions

from common import Admin, BenchError, median, sweep, versions, wait_for
import drain
import fair
import footprint
import publish
import recovery
import scale as scale_mod
import systems as systems_mod

# Sizes of each part: (full, smoke).
W1_TASKS = (20000, 300)
W1_NEW_TASKS = (10000, 300)      # the repeat with current pika: half, for the time budget
W1_OTHERS_TASKS = (5000, 300)
RUNS = (3, 1)
W4_TASKS = (20000, 300)
W4_ONE_TASKS = (5000, 100)
W5_TASKS = {"cpu_1ms": (3000, 200), "io_5ms": (2000, 200)}
W5_WORKERS = 4
SCALE_WORKERS = ((1, 2, 4, 8), (1, 2))
SCALE_SIZES = (((100, 3000), (10240, 3000), (1 << 20, 150)), ((100, 300), (10240, 100)))
# One daemon with many queues: (queues, workers per queue, idle window s, requests).
QUEUES = ((50, 2, 10.0, 50), (5, 1, 1.0, 5))
NOISY = 0.25          # other load (share of all cores) above which a drain is measured again
BUDGET = 13 * 60      # seconds after which noisy drains are no longer measured again


class Suite:
    def __init__(self, args):
        self.a = args
        self.smoke = args.smoke
        self.workdir = Path(tempfile.mkdtemp(prefix="workqd-bench-"))
        self.results: dict = {"errors": [], "retries": 0}
        self.t0 = time.monotonic()

    def size(self, pair):
        return pair[1] if self.smoke else pair[0]

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def attempt(self, what: str, fn, *args, **kw):
        """Run one measurement; retry it (twice) once the broker answers again."""
        for i in range(3):
            try:
                return fn(*args, **kw)
            except (BenchError, pika.exceptions.AMQPError, OSError) as e:
                self.log(f"{what} failed: {e!r}"[:600])
                if i == 2:
                    self.results["errors"].append(f"{what}: {e!r}"[:600])
                    return None
                self.results["retries"] += 1
                wait_for(_broker_up, 120, 0.5, "the broker to answer again")

    def drain(self, what: str, system, qtype: str, prefetch: int, n: int, workers: int = 2,
              size: int = 100, task: str = "stamp"):
        """One valid drain; measured once more when other work on the machine disturbed it."""
        r = self.attempt(what, drain.drain_once, system, qtype, prefetch, n, workers, size,
                         None, task)
        if (r and r["other_load"] > NOISY and not self.smoke
                and time.monotonic() - self.t0 < BUDGET):
            self.log(f"  {what}: other load {r['other_load']:.0%} of the machine, measuring again")
            again = self.attempt(what, drain.drain_once, system, qtype, prefetch, n, workers,
                                 size, None, task)
            if again:
                self.results["noisy_repeats"] = self.results.get("noisy_repeats", 0) + 1
                if again["other_load"] < r["other_load"]:
                    r = again
        return r

    def system(self, name: str, python: str):
        return systems_mod.make(name, python, self.workdir)

    # --- parts -------------------------------------------------------------

    def machine(self) -> None:
        admin = Admin()
        cpu = "?"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        mem = "?"
        try:
            mem = f"{int(open('/proc/meminfo').readline().split()[1]) / 1048576:.0f} GiB"
        except (OSError, ValueError):
            pass
        self.results["machine"] = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cores": os.cpu_count(), "memory": mem,
            "kernel": platform.release(), "os": _os_name(),
            "rabbitmq": admin.server_version(),
            "load_at_start": os.getloadavg()[0],
            "workqd_commit": _workqd_commit(),
        }
        admin.close()
        self.results["versions"] = {"py12": versions(self.a.py12), "pynew": versions(self.a.pynew)}
        if self.a.others:
            self.results["versions"]["others"] = versions(self.a.others)

    def w1(self) -> None:
        runs = self.size(RUNS)
        types = ["classic"] if self.smoke else ["classic", "quorum"]
        out = []
        for label, py in (("1.2.0", self.a.py12), ("current", self.a.pynew)):
            if self.smoke and label == "current":
                continue
            n = self.size(W1_TASKS if label == "1.2.0" else W1_NEW_TASKS)
            ver = self.results["versions"]["py12" if label == "1.2.0" else "pynew"]["pika"]
            self.log(f"W1 drain with pika {ver}: {n} tasks, {runs} runs per cell")
            systems = [self.system("pika", py), self.system("workqd", py)]
            for qtype in types:
                for prefetch in (1, 50):
                    for run in range(runs):
                        for s in (systems if run % 2 == 0 else systems[::-1]):
                            r = self.drain(f"W1 {s.name} {qtype} p{prefetch}", s, qtype,
                                           prefetch, n)
                            if r:
                                r.update(run=run, pika=ver)
                                out.append(r)
                                self.log(f"  W1 pika {ver} {qtype:7} prefetch {prefetch:2} "
                                         f"run {run} {s.name:8} {r['rate']:7.0f} tasks/s "
                                         f"(other load {r['other_load']:.0%})")
        self.results["w1"] = out
        self.results["w1_summary"] = drain.summarize(out)

    def w1_others(self) -> None:
        if not self.a.others:
            return
        n, runs = self.size(W1_OTHERS_TASKS), self.size(RUNS)
        types = ["classic"] if self.smoke else ["classic", "quorum"]
        ver = self.results["versions"]["others"].get("pika", "?")
        self.log(f"W1 drain, Celery and Dramatiq: {n} tasks, {runs} runs per cell")
        # Plain pika from the same venv (same pika as Dramatiq) is the baseline of each run.
        cells = [("pika", 1), ("celery", 1), ("dramatiq", 1), ("pika", 50), ("dramatiq", 50)]
        out = []
        for qtype in types:
            for run in range(runs):
                for name, prefetch in (cells if run % 2 == 0 else cells[::-1]):
                    s = self.system(name, self.a.others)
                    r = self.drain(f"W1 {name} {qtype} p{prefetch}", s, qtype, prefetch, n)
                    if r:
                        r.update(run=run, pika=ver)
                        out.append(r)
                        self.log(f"  W1 {qtype:7} prefetch {prefetch:2} run {run} {name:8} "
                                 f"{r['rate']:7.0f} tasks/s")
        self.results["w1_others"] = out
        self.results["w1_others_summary"] = drain.summarize(out)

    def w2(self) -> None:
        runs = self.size(RUNS)
        names = ["pika", "workqd"] + (["celery", "dramatiq"] if self.a.others and not self.smoke
                                      else [])
        self.log(f"W2 fair dispatch: {' '.join(names)}, {runs} runs")
        systems = [self.system(n, self.a.others if n in ("celery", "dramatiq") else self.a.py12)
                   for n in names]
        out = []
        for run in range(runs):
            for s in (systems if run % 2 == 0 else systems[::-1]):
                r = self.attempt(f"W2 {s.name}", fair.fair_once, s, n=40 if self.smoke else 120)
                if r:
                    r["run"] = run
                    out.append(r)
                    self.log(f"  W2 run {run} {s.name:8} makespan {r['makespan']:.3f}s "
                             f"{r['vs_lower_bound']:.3f}x lower bound {r['vs_greedy']:.3f}x greedy")
        self.results["w2"] = out

    def w3(self) -> None:
        runs = self.size(RUNS)
        out = []
        for qtype in (["classic"] if self.smoke else ["classic", "quorum"]):
            self.log(f"W3 recovery ({qtype}): {runs} kills")
            r = self.attempt(f"W3 {qtype}", recovery.w3, self.a.py12, self.workdir, runs,
                             qtype=qtype, batch=10 if self.smoke else 30, log=self.log)
            out.extend(r or [])
        self.results["w3"] = out

    def w4(self) -> None:
        n, n_one, runs = self.size(W4_TASKS), self.size(W4_ONE_TASKS), self.size(RUNS)
        path = publish.task_file(self.workdir, n)
        path_one = publish.task_file(self.workdir, n_one)
        self.log(f"W4 submit: {n} tasks ({n_one} for one-at-a-time and Celery), {runs} runs")
        out = []
        kinds = [("workq-submit", self.a.py12, "1.2.0", path, n),
                 ("pika-pipelined", self.a.py12, "1.2.0", path, n),
                 ("pika-one-at-a-time", self.a.py12, "1.2.0", path_one, n_one)]
        if not self.smoke:
            kinds += [("workq-submit", self.a.pynew, "current", path, n),
                      ("pika-pipelined", self.a.pynew, "current", path, n)]
            if self.a.others:
                kinds.append(("celery-apply_async", self.a.others, "-", path_one, n_one))
        for run in range(runs):
            for kind, py, label, p, count in (kinds if run % 2 == 0 else kinds[::-1]):
                r = self.attempt(f"W4 {kind}", publish.publish_once, kind, py, p, count)
                if r:
                    r.update(run=run, pika=label)
                    out.append(r)
                    self.log(f"  W4 run {run} {kind:20} pika {label:7} {r['rate']:7.0f} tasks/s")
        self.results["w4"] = out

    def w5(self) -> None:
        """Tasks that do something (1 ms of CPU, 5 ms of I/O wait) at prefetch 1 with 4
        workers: what a system's own cost per task weighs beside a real task's."""
        runs = self.size(RUNS)
        types = ["classic"] if self.smoke else ["classic", "quorum"]
        out = []
        cells = [("pika", self.a.py12, "1.2.0"), ("workqd", self.a.py12, "1.2.0")]
        if not self.smoke:
            cells += [("pika", self.a.pynew, "current"), ("workqd", self.a.pynew, "current")]
            if self.a.others:
                cells += [("pika", self.a.others, "others"), ("celery", self.a.others, "others"),
                          ("dramatiq", self.a.others, "others")]
        self.log(f"W5 real tasks, prefetch 1, {W5_WORKERS} workers, {runs} runs per cell")
        for task, sizes in W5_TASKS.items():
            n = self.size(sizes)
            for qtype in types:
                for run in range(runs):
                    for name, py, label in (cells if run % 2 == 0 else cells[::-1]):
                        r = self.drain(f"W5 {name} {task} {qtype}", self.system(name, py),
                                       qtype, 1, n, W5_WORKERS, task=task)
                        if r:
                            r.update(run=run, pika=label)
                            out.append(r)
                            self.log(f"  W5 {task} {qtype:7} run {run} {name:8} ({label:7}) "
                                     f"{r['rate']:7.0f} tasks/s")
        self.results["w5"] = out

    def scale(self) -> None:
        runs = self.size(RUNS)
        self.log("Scale: W1 at prefetch 1 by workers and body size")
        out = []
        systems = [self.system("pika", self.a.py12), self.system("workqd", self.a.py12)]
        for size, n in self.size(SCALE_SIZES):
            for workers in self.size(SCALE_WORKERS):
                for run in range(runs):
                    for s in (systems if run % 2 == 0 else systems[::-1]):
                        r = self.drain(f"scale {s.name} {workers}x{size}", s, "classic", 1, n,
                                       workers, size)
                        if r:
                            r["run"] = run
                            out.append(r)
                cell = [r for r in out if r["size"] == size and r["workers"] == workers]
                self.log(f"  scale {size:>8} B x {workers} workers: " + ", ".join(
                    f"{name} {median(r['rate'] for r in cell if r['system'] == name):.0f}/s"
                    for name in ("pika", "workqd")))
        self.results["scale"] = out

    def footprint(self) -> None:
        self.log("Idle memory and start-to-ready")
        mem = []
        cases = [("pika", self.a.py12, 2), ("workqd", self.a.py12, 1), ("workqd", self.a.py12, 2),
                 ("workqd", self.a.pynew, 2)]
        if not self.smoke:
            cases += [("workqd", self.a.py12, 4), ("workqd", self.a.py12, 8)]
            if self.a.others:
                cases += [("celery", self.a.others, 2), ("dramatiq", self.a.others, 2)]
        for name, py, workers in cases:
            for run in range(self.size(RUNS)):
                r = self.attempt(f"memory {name} {workers}", footprint.idle_memory,
                                 self.system(name, py), workers)
                if r:
                    r.update(run=run, python=py, pika=versions_pika(self.results, py, self.a))
                    mem.append(r)
            cell = [r for r in mem
                    if r["python"] == py and r["system"] == name and r["workers"] == workers]
            self.log(f"  idle {name} x{workers} (pika {versions_pika(self.results, py, self.a)}): "
                     f"RSS {median(r['rss_mib'] for r in cell):.1f} MiB")
        ready = []
        for label, py in (("1.2.0", self.a.py12), ("current", self.a.pynew)):
            for run in range(1 if self.smoke else 5):
                r = self.attempt("ready", footprint.ready_time, py, self.workdir, 4)
                if r:
                    r.update(run=run, pika=label)
                    ready.append(r)
        self.log(f"  start-to-ready, 4 workers: /readyz after "
                 f"{median(r['readyz_s'] for r in ready) * 1000:.0f} ms, all consuming after "
                 f"{median(r['all_consuming_s'] for r in ready) * 1000:.0f} ms")
        self.results["memory"], self.results["ready"] = mem, ready

    def queues(self) -> None:
        n, workers, idle, requests = self.size(QUEUES)
        self.log(f"Many queues: {n} x {workers} workers in one daemon (scale.py)")
        r = self.attempt("queues", scale_mod.measure, self.a.py12,
                         {"this": scale_mod.common.WORKQD_ROOT}, n, workers,
                         self.size(RUNS), idle, requests, log=lambda t: self.log(f"  {t}"))
        if r:
            self.results["queues"] = r

    def cleanup(self) -> None:
        try:
            wait_for(_broker_up, 60, 0.5, "the broker, to clean up")
        except BenchError as e:
            self.log(f"cannot clean up the bench's queues: {e}")
            return
        admin = Admin()
        sweep(admin)
        # Celery's native delayed delivery (quorum queues) declares these; they were ours.
        if self.a.others and not self.smoke and not self.celery_delayed_existed:
            admin.delete(*(f"celery_delayed_{i}" for i in range(28)))
            admin.delete_exchange("celery_delayed_delivery",
                                  *(f"celery_delayed_{i}" for i in range(28)))
        admin.close()

    def run(self) -> dict:
        admin = Admin()  # fails here, loudly, when there is no broker
        self.celery_delayed_existed = admin.exists("celery_delayed_0")
        admin.close()
        self.machine()
        parts = [self.w1, self.w1_others, self.w2, self.w3, self.w4, self.w5, self.scale,
                 self.footprint, self.queues]
        if self.a.only:
            parts = [p for p in parts if p.__name__ in self.a.only]
        try:
            for part in parts:
                try:
                    part()
                except Exception as e:  # one broken part must not cost the others' numbers
                    traceback.print_exc()
                    self.results["errors"].append(f"{part.__name__}: {e!r}"[:600])
        finally:
            self.cleanup()
        self.results["machine"]["load_at_end"] = os.getloadavg()[0]
        self.results["seconds"] = time.monotonic() - self.t0
        self.results["smoke"] = self.smoke
        return self.results


def versions_pika(results: dict, python: str, a) -> str:
    key = {a.py12: "py12", a.pynew: "pynew", a.others: "others"}.get(python)
    return results.get("versions", {}).get(key, {}).get("pika", "?")


def _workqd_commit() -> str:
    """The commit of the workqd code measured, marked when workqd/ has uncommitted changes."""
    from common import WORKQD_ROOT
    try:
        head = subprocess.run(["git", "-C", WORKQD_ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", WORKQD_ROOT, "status", "--porcelain", "--",
                                "workqd"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + (" + uncommitted changes in workqd/" if dirty else "")


def _broker_up() -> bool:
    try:
        Admin().close()
        return True
    except BenchError:
        return False


def _os_name() -> str:
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--py12", required=True, help="python of the venv with pika 1.2.0")
    p.add_argument("--pynew", required=True, help="python of the venv with current pika")
    p.add_argument("--others", help="python of the venv with Celery and Dramatiq")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one run each: a check")
    p.add_argument("--only", nargs="+", help="run only these parts (w1 w1_others w2 w3 w4 w5 "
                   "scale footprint queues)")
    p.add_argument("--out", default=str(Path(__file__).parent / "out" / "results.json"))
    a = p.parse_args()
    results = Suite(a).run()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out} after {results['seconds']:.0f}s "
          f"({results['retries']} retried runs, {len(results['errors'])} errors)")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
