"""W4 submit: publish N one-line tasks from a file, each publisher as a whole process.

    python bench/publish.py [--tasks 20000] [--runs 3] [--python VENV_PYTHON]
                            [--baseline-tree DIR] [--no-one-at-a-time] [--same-messages]

Publishers: ``workq-submit --file`` (pipelined confirms, mandatory, a message id
per task), plain pika with pipelined confirms, plain pika one confirmed message
at a time (``pika_publish.py``), and optionally Celery ``apply_async`` with
publisher confirms (``celery_publish.py``, with --others-python). Each is timed
from process start to exit, start-up included; the queue must then hold all N.
``--baseline-tree DIR`` adds ``workq-submit@baseline``, the same command run from
another checkout (``git archive <commit> | tar -x -C DIR``), so a change is
measured against its starting point in the same run. ``--same-messages`` adds
plain pika pipelined publishing the messages workq-submit publishes (message id,
timestamp, content type, mandatory): plain pika's own messages carry only
delivery_mode, and the broker spends more on the richer ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH, URL, Admin, BenchError, median, queue_name, venv_env, wait_for

SUBMIT, PIPELINED, ONE, CELERY = "workq-submit", "pika-pipelined", "pika-one-at-a-time", \
    "celery-apply_async"
# Plain pika pipelined publishing what workq-submit publishes (message id, timestamp,
# content type, mandatory): what the broker's work per message costs, apart from the client.
PIPELINED_SAME = "pika-pipelined-same"
BASELINE = f"{SUBMIT}@baseline"


def task_file(directory: Path, n: int, size: int = 100) -> Path:
    path = directory / f"tasks-{n}-{size}.txt"
    if not path.exists():
        lines = []
        for i in range(n):
            head = f"task-{i:07d} "
            lines.append(head + "x" * max(0, size - len(head)))
        path.write_text("\n".join(lines) + "\n")
    return path


def argv_for(kind: str, python: str, queue: str, path: Path) -> list[str]:
    bindir = Path(python).parent
    if kind == SUBMIT:
        return [str(bindir / "workq-submit"), "--url", URL, "-q", queue, "--file", str(path)]
    if kind == BASELINE:
        # Its tree first on sys.path (the venv's console script imports whichever comes).
        return [python, "-m", "workqd.submit", "--url", URL, "-q", queue, "--file", str(path)]
    if kind == PIPELINED:
        return [python, str(BENCH / "pika_publish.py"), "--url", URL, "--queue", queue,
                "--file", str(path), "--mode", "pipelined"]
    if kind == PIPELINED_SAME:
        return [python, str(BENCH / "pika_publish.py"), "--url", URL, "--queue", queue,
                "--file", str(path), "--mode", "pipelined", "--as-submit"]
    if kind == ONE:
        return [python, str(BENCH / "pika_publish.py"), "--url", URL, "--queue", queue,
                "--file", str(path), "--mode", "one-at-a-time"]
    if kind == CELERY:
        return [python, str(BENCH / "celery_publish.py"), "--queue", queue, "--file", str(path)]
    raise ValueError(kind)


def publish_once(kind: str, python: str, path: Path, n: int, qtype: str = "classic",
                 admin: Admin | None = None, tree: str | None = None) -> dict:
    own = admin is None
    admin = admin or Admin()
    q = queue_name(f"w4.{qtype}")
    try:
        # Celery declares its own queue (no x-queue-type for classic); the others need it there.
        args = ({"x-queue-type": "quorum"} if qtype == "quorum" else None) if kind == CELERY \
            else {"x-queue-type": qtype}
        admin.declare(q, args)
        t0 = time.monotonic()
        env = venv_env(python)
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(BENCH), tree])
        r = subprocess.run(argv_for(kind, python, q, path), env=env, cwd=tree,
                           capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - t0
        if r.returncode != 0:
            raise BenchError(f"{kind} exited {r.returncode}: {r.stderr[-2000:]}")
        wait_for(lambda: admin.depth(q) == n, 10, 0.02, f"{n} messages in {q}")
        inner = None
        for line in r.stdout.splitlines():
            if line.startswith("{"):
                inner = json.loads(line).get("seconds")
        return {"publisher": kind, "type": qtype, "tasks": n, "seconds": seconds,
                "rate": n / seconds, "inner_rate": n / inner if inner else None}
    finally:
        admin.delete(q)
        if kind == CELERY:
            admin.delete_exchange(q)
        if own:
            admin.close()


def w4(kinds: list[tuple[str, str]], path: Path, n: int, runs: int, qtype: str = "classic",
       log=print, trees: dict | None = None) -> list[dict]:
    """``kinds`` holds (publisher, python); each runs once per run, order alternating."""
    out = []
    admin = Admin()
    try:
        for run in range(runs):
            for kind, python in (kinds if run % 2 == 0 else kinds[::-1]):
                r = publish_once(kind, python, path, n, qtype, admin, (trees or {}).get(kind))
                r["run"] = run
                out.append(r)
                inner = f" (in-process {r['inner_rate']:.0f}/s)" if r["inner_rate"] else ""
                log(f"  W4 {qtype} run {run} {kind:20} {r['rate']:8.0f} tasks/s{inner}")
    finally:
        admin.close()
    return out


def summarize(results: list[dict], baseline: str = PIPELINED) -> list[dict]:
    rows = []
    kinds = list(dict.fromkeys(r["publisher"] for r in results))
    base = {r["run"]: r["rate"] for r in results if r["publisher"] == baseline}
    for kind in kinds:
        rs = [r for r in results if r["publisher"] == kind]
        ratios = [r["rate"] / base[r["run"]] for r in rs if r["run"] in base]
        rows.append({"publisher": kind, "runs": len(rs), "rate": median(r["rate"] for r in rs),
                     "inner_rate": median(r["inner_rate"] for r in rs),
                     "rates": [round(r["rate"]) for r in rs],
                     "ratio": median(ratios) if ratios else None})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--type", default="classic")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--others-python")
    p.add_argument("--baseline-tree", metavar="DIR",
                   help="also run workq-submit from this checkout (the starting point)")
    p.add_argument("--no-one-at-a-time", action="store_true",
                   help="leave out the slow one-confirm-at-a-time publisher")
    p.add_argument("--same-messages", action="store_true",
                   help="add plain pika pipelined publishing workq-submit's messages")
    a = p.parse_args()
    d = Path(tempfile.mkdtemp(prefix="workqd-bench-"))
    path = task_file(d, a.tasks)
    kinds = [(SUBMIT, a.python), (PIPELINED, a.python)]
    if a.same_messages:
        kinds.append((PIPELINED_SAME, a.python))
    trees = {}
    if a.baseline_tree:
        kinds.append((BASELINE, a.python))
        trees[BASELINE] = str(Path(a.baseline_tree).resolve())
    if not a.no_one_at_a_time:
        kinds.append((ONE, a.python))
    if a.others_python:
        kinds.append((CELERY, a.others_python))
    results = w4(kinds, path, a.tasks, a.runs, a.type, trees=trees)
    print(f"\nW4 submit, {a.tasks} tasks of ~100 B to a {a.type} queue, whole process, "
          f"median of {a.runs} runs")
    print(f"{'publisher':20} {'tasks/s':>9} {'in-proc':>9} {'vs pipelined':>12}  runs")
    for row in summarize(results):
        inner = f"{row['inner_rate']:.0f}" if row["inner_rate"] == row["inner_rate"] else "-"
        print(f"{row['publisher']:20} {row['rate']:>9.0f} {inner:>9} {row['ratio']:>11.2f}x  "
              f"{row['rates']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
