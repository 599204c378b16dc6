"""Does `workqctl status` slow the task rate? Drain N no-op tasks with and without a
client hammering the control socket with status requests.

    .venv/bin/python bench/control_load.py [--tasks 20000] [--calls 1000] [--runs 3]

Each run: pause the queue, publish N persistent tasks, resume, and time until
workqd_tasks_processed_total reaches N; in the loaded runs a separate process
sends `calls` status requests (one connection each, as workqctl does) from the
moment of the resume. Prints tasks/s per run and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pika
import yaml

ROOT = Path(__file__).resolve().parent.parent
URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def request(sock_path: str, req: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(json.dumps({"v": 1, **req}).encode() + b"\n")
        return json.loads(s.makefile("rb").readline())


def processed(port: int, queue: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("workqd_tasks_processed_total{") and f'queue="{queue}"' in line)


def hammer(sock_path: str, calls: int) -> subprocess.Popen:
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import control_load as c\n"
            f"t = __import__('time').monotonic()\n"
            f"for _ in range({calls}): assert c.request({sock_path!r}, {{'cmd': 'status'}})['ok']\n"
            f"print(f'{{{calls} / (__import__(\"time\").monotonic() - t):.0f}} status/s')")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ctl-bench-"))
    (tmp / "noop.py").write_text("def run(body, task):\n    pass\n")
    queue = f"bench.ctl.{uuid.uuid4().hex[:6]}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock_path = str(tmp / "c.sock")
    cfg = {"broker": {"url": URL}, "metrics": {"listen": f"127.0.0.1:{port}"},
           "control": {"socket": sock_path}, "log": {"level": "warning"},
           "queues": [{"name": queue, "type": "classic", "workers": 2, "prefetch": 50,
                       "handler": {"python": "noop:run"}}]}
    (tmp / "w.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=f"{tmp}:{ROOT}")
    daemon = subprocess.Popen([sys.executable, "-m", "workqd.cli", "-c", str(tmp / "w.yaml")],
                              env=env, stderr=open(tmp / "log", "w"))
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    results = {"quiet": [], "status hammered": []}
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock_path) or request(sock_path, {"cmd": "status"})[
                "queues"][0]["consuming"] < 2:
            assert time.monotonic() < deadline, (tmp / "log").read_text()
            time.sleep(0.1)
        done = 0.0
        props = pika.BasicProperties(delivery_mode=2)
        for run in range(args.runs):
            for kind in results:
                assert request(sock_path, {"cmd": "pause", "queue": queue})["ok"]
                while ch.queue_declare(queue, passive=True).method.consumer_count:
                    time.sleep(0.05)
                for _ in range(args.tasks):
                    ch.basic_publish("", queue, b"x" * 100, props)
                load = None
                t0 = time.monotonic()
                assert request(sock_path, {"cmd": "resume", "queue": queue})["ok"]
                if kind != "quiet":
                    load = hammer(sock_path, args.calls)
                target = done + args.tasks
                while processed(port, queue) < target:
                    assert time.monotonic() - t0 < 300, "drain too slow"
                    time.sleep(0.05)
                elapsed = time.monotonic() - t0
                done = target
                rate = args.tasks / elapsed
                results[kind].append(rate)
                extra = ""
                if load is not None:
                    out, _ = load.communicate(timeout=120)
                    extra = f" ({out.strip()}, {args.calls} calls, exit {load.returncode})"
                print(f"run {run + 1} {kind}: {rate:,.0f} tasks/s{extra}", flush=True)
        for kind, rates in results.items():
            print(f"median {kind}: {statistics.median(rates):,.0f} tasks/s")
    finally:
        daemon.terminate()
        daemon.wait(30)
        try:
            ch.queue_delete(queue)
            ch.queue_delete(queue + ".dead")
        except pika.exceptions.AMQPError:
            pass
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
