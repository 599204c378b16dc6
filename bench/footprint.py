"""Idle memory of each system and workqd's start-to-ready time.

Memory is read once every worker consumes from an empty queue: the sum over the
system's whole process tree of VmRSS (/proc/PID/status; shared pages counted in
every process that maps them, what ``ps`` and ``top`` show) and of Pss
(/proc/PID/smaps_rollup; shared pages split between the processes sharing them,
so the sum is what the tree really costs). The figure the targets use is RSS.

With ``tasks``, the queue holds that many no-op tasks before the system starts, and
memory is read once they have all run: what the workers hold once they have worked
(their garbage collector has run, and touched what they inherited), not only at start.

Start-to-ready: from spawning ``workqd`` until /readyz answers 200 and until
/metrics shows every worker consuming.
"""

from __future__ import annotations

import time
from pathlib import Path

from common import Admin, BenchError, StampDir, Workqd, bodies, fill, memory_kib, queue_name, wait_for
import systems as systems_mod


def idle_memory(system: systems_mod.System, workers: int, qtype: str = "classic",
                admin: Admin | None = None, tasks: int = 0) -> dict:
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
        return {"system": system.name, "workers": workers, "processes": len(pids),
                "tasks": tasks, "rss_mib": cur[0] / 1024, "pss_mib": cur[1] / 1024}
    finally:
        if procs is not None:
            procs.stop()
        if stamps:
            stamps.remove()
        admin.delete(q, *extra_queues)
        admin.delete_exchange(*exchanges)
        if own:
            admin.close()


def ready_time(python: str, workdir: Path, workers: int = 4, qtype: str = "classic",
               admin: Admin | None = None) -> dict:
    own = admin is None
    admin = admin or Admin()
    q = queue_name("ready")
    d = Workqd(python, workdir, [Workqd.queue(q, qtype, workers, 1, "benchtasks:stamp")])
    try:
        admin.declare(q, {"x-queue-type": qtype})  # an existing queue, as in production
        d.start()
        readyz = d.wait_ready(interval=0.002)
        wait_for(lambda: d.metric("workqd_workers", queue=q, state="idle") == workers, 30,
                 0.002, "every worker consuming")
        all_consuming = time.monotonic() - d.started
        return {"workers": workers, "readyz_s": readyz, "all_consuming_s": all_consuming}
    finally:
        d.stop()
        admin.delete(q, f"{q}.dead")
        if own:
            admin.close()
