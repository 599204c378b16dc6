"""What a full garbage collection in the master costs its forked children's sharing.

A process with the master's imports forks two idle children (as workqd forks its
workers, through ``workqd.forks``) and then runs ``gc.collect()`` itself, as the
master's collector eventually does. The collector writes into the header of every
object it examines, and each page it writes to is copied for the master alone. The
figure is the growth of the three processes' summed PSS.

    python bench/master_gc.py            # this checkout
    BENCH_WORKQD_ROOT=/path/to/other python bench/master_gc.py
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import time

from common import WORKQD_ROOT

sys.path.insert(0, WORKQD_ROOT)
# What the master holds when it forks.
for _name in ("pika", "workqd.cli", "workqd.master", "workqd.worker.process"):
    importlib.import_module(_name)
from workqd import forks  # noqa: E402


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def main() -> None:
    if hasattr(forks, "settle"):
        forks.settle()   # what the master does before its first fork
    children = []
    for _ in range(2):
        pid = forks.fork()
        if pid == 0:
            time.sleep(60)   # killed below long before
            os._exit(0)
        children.append(pid)
    try:
        time.sleep(0.3)
        tree = [os.getpid(), *children]
        before = sum(pss_kib(p) for p in tree)
        gc.collect()
        after = sum(pss_kib(p) for p in tree)
        print(f"{WORKQD_ROOT}: master + 2 children {before / 1024:.1f} MiB PSS; after a full "
              f"collection in the master {after / 1024:.1f} MiB ({(after - before) / 1024:+.1f})")
    finally:
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
