"""Idle memory of each system and workqd's start-to-ready time.

Memory is read once every worker consumes from an empty queue: the sum over the
system's whole process tree of VmRSS (/proc/PID/status; shared pages counted in
every process that maps them, what ``ps`` and ``top`` show) and of Pss
(/proc/PID/smaps_rollup; shared pages split between the processes sharing them,
so the sum is what the tree really costs). The figure the targets use is RSS.

With ``tasks``, the queue holds that many no-op tasks before the system starts, and
memory is read once they have all run: what the workers hold once they have worked
(their garbage collector has run, and touched what they inherited), not only at start.

With ``--poller-cost``, each workqd run is read once more right after a kill -9
of its queue poller, before the master replaces it (``RESPAWN_DELAY``, 1 s): what
the tree would cost without that process, before the master took on any of its work.

Start-to-ready: from spawning ``workqd`` until /readyz answers 200 and until
/metrics shows every worker consuming.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

from common import Admin, BenchError, StampDir, Workqd, bodies, fill, memory_kib, queue_name, wait_for
import systems as systems_mod

_READY = re.compile(r"ready: every worker is consuming \((\d+\.\d+)s after start\)")


def idle_memory(system: systems_mod.System, workers: int, qtype: str = "classic",
                admin: Admin | None = None, tasks: int = 0, poller_cost: bool = False) -> dict:
    own = admin is None
    admin = admin or Admin()
    q = queue_name(f"mem.{system.name}")
    extra_queues, exchanges = system.leftovers(q)
    procs = None
    stamps = StampDir() if tasks else None
    try:
        admin.declare(q, system.queue_arguments(q, qtype))
        if tasks:
            fill(q, system.messages(q, bodies(tasks, 100)), admin)
        procs = system.start(q, qtype, workers, 1,
                             {"BENCH_STAMP_DIR": stamps.path if stamps else "/nonexistent"})
        expected = 1 if system.name == systems_mod.CELERY else workers

        def consuming():
            if not procs.alive():
                raise BenchError(f"{system.name} exited: {procs.last_line()}")
            return admin.consumers(q) >= expected
        wait_for(consuming, 60, 0.01, f"{expected} consumers on {q}")
        if stamps:
            wait_for(lambda: stamps.count() >= tasks, 60 + tasks / 200, 0.05,
                     f"{tasks} tasks run")
        if isinstance(procs, Workqd):
            wait_for(lambda: procs.metric("workqd_workers", queue=q, state="idle") == workers,
                     30, 0.01, "every worker idle")
        # Let start-up garbage settle: sample until two readings 100 ms apart agree within 1%.
        # Every process of the system counts: for workqd the master, its workers and
        # its queue poller (Workqd.pids() is that whole tree).
        prev = memory_kib(procs.pids())
        for _ in range(20):
            time.sleep(0.1)
            pids = procs.pids()
            cur = memory_kib(pids)
            if abs(cur[0] - prev[0]) <= prev[0] * 0.01:
                break
            prev = cur
        row = {"system": system.name, "workers": workers, "processes": len(pids),
               "tasks": tasks, "rss_mib": cur[0] / 1024, "pss_mib": cur[1] / 1024}
        if poller_cost and isinstance(procs, Workqd):
            row["pss_without_poller_mib"] = _pss_without_poller(procs, pids)
        return row
    finally:
        if procs is not None:
            procs.stop()
        if stamps:
            stamps.remove()
        admin.delete(q, *extra_queues)
        admin.delete_exchange(*exchanges)
        if own:
            admin.close()


def _pss_without_poller(d: Workqd, pids: list[int]) -> float:
    """PSS in MiB of the daemon's tree once its queue poller has exited: kill -9 it and
    read the rest before the master starts another (a second later)."""
    poller = d.poller_pids()
    if len(poller) != 1:
        raise BenchError(f"expected one workqd-poller among {pids}, found {poller}")
    os.kill(poller[0], signal.SIGKILL)

    def exited() -> bool:
        # Its memory is released when it exits, before the master reaps it.
        try:
            with open(f"/proc/{poller[0]}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True
    wait_for(exited, 0.5, 0.002, "the queue poller's exit")
    return memory_kib([p for p in pids if p != poller[0]])[1] / 1024


def ready_time(python: str, workdir: Path, workers: int = 4, qtype: str = "classic",
               admin: Admin | None = None) -> dict:
    own = admin is None
    admin = admin or Admin()
    q = queue_name("ready")
    # At level info, for the master's own "ready: every worker is consuming (X s after
    # start)", counted from the master's start rather than from the spawn of the process.
    d = Workqd(python, workdir, [Workqd.queue(q, qtype, workers, 1, "benchtasks:stamp")],
               log_level="info")
    try:
        admin.declare(q, {"x-queue-type": qtype})  # an existing queue, as in production
        d.start()
        readyz = d.wait_ready(interval=0.002)
        wait_for(lambda: d.metric("workqd_workers", queue=q, state="idle") == workers, 30,
                 0.002, "every worker consuming")
        all_consuming = time.monotonic() - d.started
        found = wait_for(lambda: _READY.search(d.procs.log_path.read_text(errors="replace")),
                         10, 0.01, "the master's ready line")
        return {"workers": workers, "readyz_s": readyz, "all_consuming_s": all_consuming,
                "master_ready_s": float(found.group(1))}
    finally:
        d.stop()
        admin.delete(q, f"{q}.dead")
        if own:
            admin.close()



def main() -> None:
    import argparse
    import json
    import statistics
    import tempfile

    import common

    p = argparse.ArgumentParser(description="Idle memory of workqd against plain pika consumers "
                                "in the same run, and workqd's start-to-ready time.")
    p.add_argument("--python", default=sys.executable,
                   help="the venv's python to run every system with (default: this one)")
    p.add_argument("--workers", type=int, nargs="*", default=[2, 8],
                   help="worker counts to read workqd's memory at")
    p.add_argument("--runs", type=int, default=3, help="runs per cell; medians are shown")
    p.add_argument("--tasks", type=int, default=0,
                   help="no-op tasks to run before reading memory (0: read at start)")
    p.add_argument("--ready", type=int, nargs="*", default=[],
                   help="worker counts to time start-to-ready at (e.g. --ready 64)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ROOT",
                   help="a workqd checkout to measure (repeatable; runs alternate between "
                   "them); default: this one")
    p.add_argument("--poller-cost", action="store_true",
                   help="also read each workqd tree right after a kill -9 of its queue poller")
    p.add_argument("--json", action="store_true", help="print every run as JSON as well")
    a = p.parse_args()
    variants = [tuple(v.split("=", 1)) for v in a.variant] or [("workqd", common.WORKQD_ROOT)]

    def use(root: str) -> None:
        common.WORKQD_ROOT = root   # what venv_env puts on the daemon's PYTHONPATH

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    admin = Admin()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-footprint-") as d:
            workdir = Path(d)
            pika_sys = systems_mod.make(systems_mod.PIKA, a.python, workdir)
            wq = systems_mod.make(systems_mod.WORKQD, a.python, workdir)
            # Pss splits a library's pages with every process on the machine that maps it,
            # so plain pika is read in the same runs, between the variants.
            for workers in a.workers:
                for run in range(a.runs):
                    r = idle_memory(pika_sys, 2, admin=admin, tasks=a.tasks)
                    r.update(variant="pika", run=run)
                    rows.append(r)
                    for name, root in (variants if run % 2 == 0 else variants[::-1]):
                        use(root)
                        r = idle_memory(wq, workers, admin=admin, tasks=a.tasks,
                                        poller_cost=a.poller_cost)
                        r.update(variant=name, run=run)
                        rows.append(r)
                base = [r for r in rows if r["variant"] == "pika" and r["tasks"] == a.tasks]
                pss2 = med(base, "pss_mib")
                print(f"plain pika x2: RSS {med(base, 'rss_mib'):.1f} MiB, PSS {pss2:.1f} MiB",
                      flush=True)
                for name, _ in variants:
                    cell = [r for r in rows if r["variant"] == name and r["workers"] == workers]
                    pss = med(cell, "pss_mib")
                    line = (f"{name} x{workers} ({cell[0]['processes']} processes): "
                            f"RSS {med(cell, 'rss_mib'):.1f} MiB, PSS {pss:.1f} MiB = "
                            f"{pss / pss2:.2f}x two plain consumers")
                    at2 = [r for r in rows if r["variant"] == name and r["workers"] == 2]
                    if workers > 2 and at2:
                        # The target for workers beyond the first two: against one consumer.
                        each = (pss - med(at2, "pss_mib")) / (workers - 2)
                        line += (f"; each worker beyond 2: {each:.1f} MiB = "
                                 f"{each / (pss2 / 2):.2f}x one plain consumer")
                    print(line, flush=True)
                    if a.poller_cost:
                        gone = med(cell, "pss_without_poller_mib")
                        print(f"{name} x{workers} without its queue poller (killed just before "
                              f"the reading): PSS {gone:.1f} MiB = {gone / pss2:.2f}x two plain "
                              f"consumers; the poller cost {pss - gone:.1f} MiB", flush=True)
            for workers in a.ready:
                ready = []
                for run in range(a.runs):
                    for name, root in (variants if run % 2 == 0 else variants[::-1]):
                        use(root)
                        r = ready_time(a.python, workdir, workers, admin=admin)
                        r.update(variant=name, run=run)
                        ready.append(r)
                rows += ready
                for name, _ in variants:
                    cell = [r for r in ready if r["variant"] == name]
                    print(f"{name} x{workers} from spawning workqd: /readyz "
                          f"{med(cell, 'readyz_s'):.3f} s, every worker consuming "
                          f"{med(cell, 'all_consuming_s'):.3f} s; the master's own ready line: "
                          f"{med(cell, 'master_ready_s'):.2f} s after its start", flush=True)
    finally:
        admin.close()
    if a.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
