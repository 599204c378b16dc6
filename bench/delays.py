"""Delayed tasks: how late after its due time does each one start?

    python bench/delays.py [--tasks 10000] [--max-delay 120] [--workers 4] [--python VENV_PYTHON]
    WORKQ_TEST_NODE_OFFSET=N python bench/delays.py --cluster [--kill wqa] [--kill-after 10]

Submits ``--tasks`` tasks through workqd.client, each with a whole-second delay drawn
from 1 s to ``--max-delay`` s, to a fresh queue a real workqd daemon consumes; the
handler (``record`` below) notes when it starts and the due time the task carries
(``x-workq-due-ms``). Reports the lateness (start - due) at p50, p99 and max, and
fails if any task started early, ran twice or never came. The p50 is also given by
the number of levels a task waited in (its delay's set bits): the cost of each hop. The due time is written
by the submitting client's clock and the start read on the same machine, so the
numbers include no clock difference.

``--cluster`` runs it on the throwaway 3-node cluster of tests/brokers.py (started
and torn down here; set WORKQ_TEST_NODE_OFFSET as for the cluster tests), the daemon
and the client given all three nodes, and kills the ``--kill`` node with SIGKILL
``--kill-after`` seconds after the last task was submitted, while the tasks wait in
the delay levels; the node stays down to the end. A task may then run twice
(at-least-once): counted, not a failure; early or lost ones are.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
LEDGER_ENV = "BENCH_DELAYS_LEDGER"


def record(body: bytes, task) -> None:
    """The handler: one line per run, ``start_time due_ms message_id`` (an O_APPEND write
    of one line is atomic, so workers never interleave)."""
    line = f"{time.time():.6f} {task.headers.get('x-workq-due-ms')} {task.message_id}\n"
    fd = os.open(os.environ[LEDGER_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench/delays.py: timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10000)
    ap.add_argument("--max-delay", type=int, default=120)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--python", default=sys.executable, help="Python of the daemon")
    ap.add_argument("--cluster", action="store_true",
                    help="on the 3-node test cluster, one node killed while the tasks wait")
    ap.add_argument("--kill", default="wqa",
                    help="the node to kill (--cluster); none: a baseline on the cluster")
    ap.add_argument("--kill-after", type=float, default=10.0,
                    help="seconds after the last submit (--cluster)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if not args.cluster:
        return run(args, [URL], None)
    sys.path.insert(0, str(ROOT / "tests"))
    from brokers import Cluster
    cluster = Cluster()
    try:
        t0 = time.monotonic()
        cluster.start()
        print(f"bench/delays.py: cluster up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        return run(args, cluster.urls, cluster)
    finally:
        cluster.teardown()


def run(args, urls: list[str], cluster) -> int:
    import pika

    from workqd.client import Client

    tmp = Path(tempfile.mkdtemp(prefix="workqd-bench-delays."))
    ledger = tmp / "ledger"
    queue = f"bench.delays.{os.getpid()}"
    port = 9600 + os.getpid() % 300
    broker = {"urls": urls, "heartbeat": 5} if cluster else {"url": urls[0]}
    cfg = {"broker": broker, "metrics": {"listen": f"127.0.0.1:{port}"},
           "log": {"level": "warning"},
           "queues": [{"name": queue, "type": "quorum", "workers": args.workers,
                       "prefetch": 50, "handler": {"python": "delays:record"}}]}
    (tmp / "workqd.yaml").write_text(json.dumps(cfg))   # JSON is YAML
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH), str(ROOT)]),
               **{LEDGER_ENV: str(ledger)})
    log = open(tmp / "workqd.log", "ab")
    daemon = subprocess.Popen([args.python, "-m", "workqd.cli", "-c", str(tmp / "workqd.yaml")],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _ready(port) or daemon.poll() is not None, 30, "workqd ready")
        if daemon.poll() is not None:
            raise SystemExit(f"workqd exited {daemon.returncode}: see {tmp / 'workqd.log'}")
        rng = random.Random(1)
        by_delay: dict[int, int] = {}
        for _ in range(args.tasks):
            d = rng.randint(1, args.max_delay)
            by_delay[d] = by_delay.get(d, 0) + 1
        ids = set()
        hops: dict[str, int] = {}   # levels a task waits in: its delay's set bits
        t0 = time.monotonic()
        with Client(urls) as client:
            for d, n in sorted(by_delay.items()):
                for i in range(0, n, 500):
                    for mid in client.submit_many([b"x"] * min(500, n - i), queue=queue,
                                                  delay=d):
                        ids.add(mid)
                        hops[mid] = bin(d).count("1")
        submitted_in = time.monotonic() - t0
        killed = {}
        if cluster and args.kill != "none":
            victim = cluster.nodes[args.kill].node
            rows = cluster.nodes[args.kill].json("rabbitmqctl", "list_queues", "name", "leader")
            led = [r["name"] for r in rows or []
                   if r["name"].startswith("workq.delay.") and r.get("leader") == victim]
            time.sleep(max(0.0, args.kill_after - (time.monotonic() - t0 - submitted_in)))
            waiting = args.tasks - len(_lines(ledger))
            cluster.kill9(args.kill)
            killed = {"killed": args.kill, "killed_after_submit_s": args.kill_after,
                      "levels_it_led": len(led), "waiting_at_kill": waiting}
            print(f"bench/delays.py: {args.kill} killed (kill -9), {waiting} tasks waiting",
                  file=sys.stderr)

        def ran_ids() -> set:
            return {line.split()[2] for line in _lines(ledger)}
        _wait(lambda: len(ran_ids()) >= args.tasks, args.max_delay + 120,
              f"{args.tasks} tasks run")
        rows = [line.split() for line in _lines(ledger)]
        ran = [r[2] for r in rows]
        first: dict[str, float] = {}
        for r in rows:
            late = float(r[0]) - int(r[1]) / 1000
            first[r[2]] = min(late, first.get(r[2], late))
        lateness = sorted(first.values())
        by_hops: dict[int, list[float]] = {}
        for mid, late in first.items():
            by_hops.setdefault(hops.get(mid, -1), []).append(late)
        early = sum(1 for x in lateness if x < 0)
        lost = len(ids - set(ran))
        twice = len(ran) - len(set(ran))
        result = {"tasks": args.tasks, "max_delay_s": args.max_delay, "workers": args.workers,
                  **killed, "submitted_in_s": round(submitted_in, 2),
                  "lateness_p50_s": round(lateness[len(lateness) // 2], 3),
                  "lateness_p99_s": round(lateness[int(len(lateness) * 0.99)], 3),
                  "lateness_max_s": round(lateness[-1], 3),
                  "early": early, "lost": lost, "ran_twice": twice,
                  "lateness_p50_s_by_levels": {n: round(sorted(v)[len(v) // 2], 3)
                                               for n, v in sorted(by_hops.items())}}
        print(json.dumps(result))
        return 1 if early or lost or (twice and not cluster) else 0
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        up = cluster.url(cluster.any_up()) if cluster else urls[0]
        conn = pika.BlockingConnection(pika.URLParameters(up))
        ch = conn.channel()
        for name in (queue, f"{queue}.dead"):
            ch.queue_delete(name)
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
