"""A/B: W1 drains of several workqd checkouts (a patch against main), plain pika as the anchor.

    bench/.venv-bench/bin/python bench/ab.py --variant main=. --variant patched=/path/to/checkout \
        [--tasks 20000] [--runs 3] [--prefetch 1 50] [--type classic]

Each run drains once with plain pika and once with every variant, in rotating
order; the summary gives each variant's median tasks/s and median per-run ratio
to plain pika. A variant is the root of a checkout (the directory holding
``workqd/``), put first on the workers' PYTHONPATH.
"""

from __future__ import annotations

import argparse
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

    def start(self, queue, qtype, workers, prefetch, env, task="stamp"):
        bench = str(Path(__file__).resolve().parent)
        return super().start(queue, qtype, workers, prefetch,
                             {**env, "PYTHONPATH": f"{bench}:{self.root}"}, task)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", required=True, metavar="LABEL=ROOT")
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prefetch", type=int, nargs="+", default=[1, 50])
    p.add_argument("--type", default="classic")
    p.add_argument("--python", default=sys.executable)
    a = p.parse_args()
    wd = Path(tempfile.mkdtemp(prefix="workqd-bench-"))
    variants = [VariantWorkqd(a.python, wd, *v.split("=", 1)) for v in a.variant]
    pika = systems_mod.make("pika", a.python, wd)
    admin = Admin()
    for prefetch in a.prefetch:
        rates: dict[str, list[float]] = {"pika": []}
        ratios: dict[str, list[float]] = {}
        for run in range(a.runs):
            order = [pika, *variants]
            order = order[run % len(order):] + order[:run % len(order)]
            got = {}
            for s in order:
                label = getattr(s, "label", "pika")
                got[label] = drain_once(s, a.type, prefetch, a.tasks, admin=admin)["rate"]
                rates.setdefault(label, []).append(got[label])
            for v in variants:
                ratios.setdefault(v.label, []).append(got[v.label] / got["pika"])
            print(f"prefetch {prefetch} run {run}: " +
                  ", ".join(f"{k} {v:.0f}/s" for k, v in got.items()), flush=True)
        print(f"== {a.type} prefetch {prefetch}, {a.tasks} tasks, median of {a.runs} runs: "
              f"pika {median(rates['pika']):.0f}/s; " + "; ".join(
                  f"{v.label} {median(rates[v.label]):.0f}/s = {median(ratios[v.label]):.2f}x"
                  for v in variants), flush=True)
    admin.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
