"""A/B: W1 drains of several workqd checkouts (a patch against main), plain pika as the anchor.

    bench/.venv-bench/bin/python bench/ab.py --variant main=. --variant patched=/path/to/checkout \
        [--tasks 20000] [--runs 3] [--prefetch 1 50] [--type classic] [--baseline main]

Each run drains once with plain pika and once with every variant, in an order
that changes from run to run (``run_order``; a multiple of 2 x (variants + 1)
runs is a balanced design). The summary gives each variant's median tasks/s,
its median per-run ratio to plain pika, worker and whole-daemon CPU per task (and
plain pika's consumers' CPU per task beside them), and
the workers' read/write system calls and context switches per task. A variant is
the root of a checkout (the directory holding ``workqd/``), put first on the
workers' PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from common import Admin, median
from drain import drain_once
import systems as systems_mod


class VariantWorkqd(systems_mod.WorkqdSystem):
    def __init__(self, python: str, workdir: Path, label: str, root: str):
        super().__init__(python, workdir)
        self.label = label
        self.root = str(Path(root).resolve())
        self.worker_cpu: list[float] = []   # seconds, per drain: every worker, start-up included
        self.daemon_cpu: list[float] = []   # ... and the master and its queue poller as well
        # Per drain, every worker: read/write-class syscalls (/proc/PID/io syscr + syscw)
        # and context switches of all its threads (voluntary, involuntary).
        self.worker_syscalls: list[int] = []
        self.worker_switches: list[tuple[int, int]] = []

    def start(self, queue, qtype, workers, prefetch, env, task="stamp"):
        bench = str(Path(__file__).resolve().parent)
        d = super().start(queue, qtype, workers, prefetch,
                          {**env, "PYTHONPATH": f"{bench}:{self.root}"}, task)
        stop = d.stop

        def stop_and_count(*args, **kwargs):
            # Read the workers' CPU while they live: an exited process's is gone.
            self.worker_cpu.append(sum(_cpu_seconds(p) for p in d.worker_pids()))
            self.daemon_cpu.append(sum(_cpu_seconds(p) for p in d.pids()))
            self.worker_syscalls.append(sum(_syscalls(p) for p in d.worker_pids()))
            switches = [_switches(p) for p in d.worker_pids()]
            self.worker_switches.append((sum(v for v, _ in switches),
                                         sum(i for _, i in switches)))
            return stop(*args, **kwargs)
        d.stop = stop_and_count
        return d


def _count_cpu(system) -> list[float]:
    """CPU seconds of ``system``'s processes, one entry per drain, read as it stops."""
    cpu: list[float] = []
    start = system.start

    def start_and_count(*args, **kwargs):
        procs = start(*args, **kwargs)
        stop = procs.stop

        def stop_and_count(*a, **kw):
            cpu.append(sum(_cpu_seconds(p) for p in procs.pids()))
            return stop(*a, **kw)
        procs.stop = stop_and_count
        return procs
    system.start = start_and_count
    return cpu


def run_order(systems: list, run: int) -> list:
    """The order of the drains in run ``run``: every rotation of the list, then every
    rotation of it reversed, so that over 2 x len(systems) runs each system drains right
    after each other one equally often. Plain rotations are not enough: with [pika, A, B]
    they put B right after A in two runs of three, and a drain right after a workqd
    drain runs a few percent slower (measured 2026-12-04: whichever variant was named
    last lost 3.5-4 %, and swapping the names swapped the loss)."""
    n = len(systems)
    base = systems if (run // n) % 2 == 0 else systems[::-1]
    k = run % n
    return base[k:] + base[:k]


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _syscalls(pid: int) -> int:
    """Read- and write-class system calls so far (read, recv*, write, send*, ...)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines())
    except OSError:
        return 0
    return int(fields["syscr"]) + int(fields["syscw"])


def _switches(pid: int) -> tuple[int, int]:
    """Context switches of every thread of ``pid``: (voluntary, involuntary)."""
    vol = invol = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol += int(line.split()[1])
        except OSError:
            pass
    return vol, invol


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", required=True, metavar="LABEL=ROOT")
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prefetch", type=int, nargs="+", default=[1, 50])
    p.add_argument("--type", default="classic")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--baseline", metavar="LABEL",
                   help="also give every other variant's median per-run ratio to this one "
                        "(paired: both drain in the same run, back to back)")
    a = p.parse_args()
    wd = Path(tempfile.mkdtemp(prefix="workqd-bench-"))
    variants = [VariantWorkqd(a.python, wd, *v.split("=", 1)) for v in a.variant]
    pika = systems_mod.make("pika", a.python, wd)
    pika_cpu = _count_cpu(pika)
    admin = Admin()
    for prefetch in a.prefetch:
        rates: dict[str, list[float]] = {"pika": []}
        ratios: dict[str, list[float]] = {}
        paired: dict[str, list[float]] = {}
        for run in range(a.runs):
            order = run_order([pika, *variants], run)
            got = {}
            for s in order:
                label = getattr(s, "label", "pika")
                got[label] = drain_once(s, a.type, prefetch, a.tasks, admin=admin)["rate"]
                rates.setdefault(label, []).append(got[label])
            for v in variants:
                ratios.setdefault(v.label, []).append(got[v.label] / got["pika"])
                if a.baseline and v.label != a.baseline:
                    paired.setdefault(v.label, []).append(got[v.label] / got[a.baseline])
            print(f"prefetch {prefetch} run {run}: " +
                  ", ".join(f"{k} {v:.0f}/s" for k, v in got.items()), flush=True)
        print(f"== {a.type} prefetch {prefetch}, {a.tasks} tasks, median of {a.runs} runs: "
              f"pika {median(rates['pika']):.0f}/s; " + "; ".join(
                  f"{v.label} {median(rates[v.label]):.0f}/s = {median(ratios[v.label]):.2f}x"
                  for v in variants), flush=True)
        for label, values in paired.items():
            print(f"== {a.type} prefetch {prefetch}: {label} / {a.baseline} = "
                  f"{median(values):.3f}x (median of {len(values)} paired runs: "
                  f"{', '.join(f'{r:.3f}' for r in values)})", flush=True)
        pika_us = median(pika_cpu[-a.runs:]) / a.tasks * 1e6
        print(f"== {a.type} prefetch {prefetch}: worker CPU per task (median): "
              f"pika {pika_us:.1f} us; " + "; ".join(
                  f"{v.label} {median(v.worker_cpu[-a.runs:]) / a.tasks * 1e6:.1f} us = "
                  f"{median(v.worker_cpu[-a.runs:]) / a.tasks * 1e6 / pika_us:.2f}x pika's"
                  for v in variants), flush=True)
        print(f"== {a.type} prefetch {prefetch}: daemon CPU per task (median, master and poller "
              f"included): " + "; ".join(
                  f"{v.label} {median(v.daemon_cpu[-a.runs:]) / a.tasks * 1e6:.1f} us"
                  for v in variants), flush=True)
        print(f"== {a.type} prefetch {prefetch}: per task in the workers (median): " + "; ".join(
            f"{v.label} {median(v.worker_syscalls[-a.runs:]) / a.tasks:.2f} read/write "
            f"syscalls, {median([s[0] for s in v.worker_switches[-a.runs:]]) / a.tasks:.2f} "
            f"voluntary + {median([s[1] for s in v.worker_switches[-a.runs:]]) / a.tasks:.2f} "
            f"involuntary context switches" for v in variants), flush=True)
    admin.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
