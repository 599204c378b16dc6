"""Profile workqd's hot path: py-spy on each worker (and on plain pika consumers) during a W1 drain.

    bench/.venv-bench/bin/python bench/profile.py [--tasks 60000] [--prefetch 1 50]
                                                  [--python VENV_PYTHON] [--out bench/out]

For each prefetch, the queue is pre-filled, the system started, and
``py-spy record --format raw --threads --nonblocking`` attached to every
worker process until the queue is drained. The collapsed stacks are written to
OUT/profile-<system>-p<prefetch>.txt (load them into speedscope or
flamegraph.pl) and summarized: per thread, the share of samples spent in each
function (inclusive) and at the top of the stack (self), plus what share of
samples each thread was running at all.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Admin, StampDir, bodies, fill, queue_name, wait_for
import systems as systems_mod

PY_SPY_RATE = 250   # samples/s per process; --nonblocking keeps the target running


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a living process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_costs(pids: list[int], tasks: int) -> list[str]:
    """Per thread (summed over processes): CPU us, context switches per task."""
    acc: dict[str, list[float]] = {}
    tck = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
                status = open(f"/proc/{pid}/task/{tid}/status").read()
            except OSError:
                continue
            vol = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
            invol = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
            name = "main" if tid == str(pid) else name
            a = acc.setdefault(name, [0, 0, 0, 0])
            a[0] += int(fields[11]) / tck
            a[1] += int(fields[12]) / tck
            a[2] += vol
            a[3] += invol
    return [f"thread {name:10} user {1e6 * u / tasks:5.0f} us  system {1e6 * s / tasks:5.0f} us  "
            f"voluntary switches {v / tasks:4.2f}  involuntary {i / tasks:4.2f}  per task"
            for name, (u, s, v, i) in sorted(acc.items())]


def profile_drain(system: systems_mod.System, pyspy: str, prefetch: int, n: int, out: Path,
                  notes: list[str], qtype: str = "classic", workers: int = 2) -> Path:
    admin = Admin()
    q = queue_name(f"prof.{system.name}")
    extra, _ = system.leftovers(q)
    stamps = StampDir()
    recorders = []
    procs = None
    raw = out / f"profile-{system.name}-{qtype}-p{prefetch}.txt"
    try:
        admin.declare(q, system.queue_arguments(q, qtype))
        fill(q, system.messages(q, bodies(n, 100)), admin)
        procs = system.start(q, qtype, workers, prefetch, {"BENCH_STAMP_DIR": stamps.path})
        if system.name == systems_mod.WORKQD:
            targets = wait_for(lambda: len(procs.worker_pids()) == workers and procs.worker_pids(),
                               30, 0.005, "workers forked")
        else:
            targets = [p.pid for p in procs.procs]
        for i, pid in enumerate(targets):
            recorders.append(subprocess.Popen(
                [pyspy, "record", "--pid", str(pid), "--rate", str(PY_SPY_RATE), "--format", "raw",
                 "--threads", "--nonblocking", "-o", f"{raw}.{i}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: stamps.count() >= n, 60 + n / 200, 0.05, "the drain")
        calls, first, last = stamps.window()
        cpu = sum(cpu_seconds(pid) for pid in targets)
        threads = thread_costs(targets, calls)
        line = (f"{system.name} prefetch {prefetch}: {calls} tasks at "
                f"{calls / (last - first):.0f}/s "
                f"under py-spy; worker CPU {1e6 * cpu / calls:.0f} us per task "
                f"(user+system, all worker processes, start-up included)")
        print(line)
        notes.append(line)
        for t in threads:
            notes.append(f"    {t}")
            print(f"    {t}")
    finally:
        for r in recorders:
            r.send_signal(signal.SIGINT)
        for r in recorders:
            try:
                r.wait(20)
            except subprocess.TimeoutExpired:
                r.kill()
        if procs is not None:
            procs.stop()
        stamps.remove()
        admin.delete(q, *extra)
        admin.close()
    with open(raw, "w") as f:
        for i in range(len(recorders)):
            part = Path(f"{raw}.{i}")
            if part.exists():
                f.write(part.read_text())
                part.unlink()
    return raw


def summarize(raw: Path, top: int = 22) -> str:
    """Inclusive and self shares per thread from py-spy's collapsed stacks (on-CPU samples)."""
    per_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    self_t: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        count = int(count)
        frames = stack.split(";")
        thread = _thread_name(frames[0])
        frames = frames[1:]
        totals[thread] += count
        leaf = frames[-1] if frames else "?"
        seen = set()
        for fr in frames:
            fn = _short(fr)
            if fn not in seen:
                per_thread[thread][fn] += count
                seen.add(fn)
        self_t[thread][_short(leaf)] += count
    lines = [f"## {raw.name} (on-CPU samples at {PY_SPY_RATE}/s per process)"]
    for thread in sorted(totals, key=lambda t: -totals[t]):
        tot = totals[thread]
        lines.append(f"\n### {thread}: {tot} on-CPU samples")
        lines.append("inclusive % of this thread's samples:")
        for fn, c in per_thread[thread].most_common(top):
            lines.append(f"  {100 * c / tot:5.1f}%  {fn}")
        lines.append("self (top of stack) %:")
        for fn, c in self_t[thread].most_common(12):
            lines.append(f"  {100 * c / tot:5.1f}%  {fn}")
    return "\n".join(lines)


def _thread_name(frame: str) -> str:
    # py-spy --threads puts "thread (0x7f..)" or "process 123:..." first.
    if frame.startswith("process"):
        return frame.split(":", 1)[0]
    return frame


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    tail = "/".join(parts[-2:]) if "site-packages" in path or "workqd" in path else parts[-1]
    return f"{name} ({tail})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=60000)
    p.add_argument("--prefetch", type=int, nargs="+", default=[1, 50])
    p.add_argument("--systems", nargs="+", default=["workqd", "pika"])
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out", default=str(Path(__file__).parent / "out"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pyspy = str(Path(sys.executable).parent / "py-spy")
    wd = Path(tempfile.mkdtemp(prefix="workqd-bench-"))
    reports, notes = [], []
    for prefetch in a.prefetch:
        for name in a.systems:
            raw = profile_drain(systems_mod.make(name, a.python, wd), pyspy, prefetch, a.tasks, out,
                                notes)
            reports.append(summarize(raw))
    text = "\n".join(notes) + "\n\n" + "\n\n".join(reports)
    (out / "profile-summary.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
