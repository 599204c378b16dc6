"""The producer's side: workqd.client's submit() latency, and what a delay costs.

    python bench/client.py [--tasks 5000] [--latency-tasks 2000] [--per-process 30]
    python bench/client.py --wsgi [--requests 10000] [--callers 8]

- latency: ``Client.submit`` one task at a time from a warm client (p50, p99), beside
  ``workq-submit`` started once per task (what a web application forking the command
  pays), in the same run;
- delayed publish: ``submit_many`` of N tasks at once and with a 2 s delay, each
  timed until the broker confirmed the last, and the broker's CPU (beam.smp) per
  task until every task is in its work queue (the delayed ones after their trip
  through the levels).

``--wsgi`` instead: the client inside the two kinds of web server a producer runs
(tests/integration/test_client_wsgi.py at full size): a threaded WSGI server sharing
one client, and a prefork server whose ``--callers`` worker processes inherit the
parent's client. ``--callers`` concurrent HTTP callers post ``--requests`` in all to
each; the view times its own ``submit()`` (p50, p99, max: measured inside the
server). Fails unless every request got its own confirmed id and the queue then
holds each body exactly once.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pika

from common import URL, Admin, _broker_pids, _proc_cpu, median, queue_name, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from workqd.client import Client   # noqa: E402  (the checkout's, not an installed one)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def latency(client: Client, admin: Admin, n: int, per_process: int) -> dict:
    q = queue_name("client-latency")
    admin.declare(q)
    try:
        warm = []
        client.submit(b"warm-up", queue=q)
        for i in range(n):
            t = time.perf_counter()
            client.submit(f"task {i}".encode(), queue=q)
            warm.append(time.perf_counter() - t)
        forked = []
        for i in range(per_process):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "workqd.submit", "--url", URL, "-q", q,
                            f"task {i}"], check=True, capture_output=True)
            forked.append(time.perf_counter() - t)
    finally:
        admin.delete(q)
    return {"submit_p50_ms": percentile(warm, 50) * 1000,
            "submit_p99_ms": percentile(warm, 99) * 1000,
            "workq_submit_per_task_p50_ms": median(forked) * 1000}


def broker_cpu() -> float:
    return sum(_proc_cpu(p) for p in _broker_pids())


def publish(client: Client, admin: Admin, n: int, delay: float | None) -> dict:
    q = queue_name("client-delay" if delay else "client-plain")
    admin.declare(q)
    try:
        bodies = [f"task {i}".encode() for i in range(n)]
        cpu0, t0 = broker_cpu(), time.perf_counter()
        client.submit_many(bodies, queue=q, delay=delay)
        confirmed = time.perf_counter() - t0
        wait_for(lambda: admin.depth(q) >= n, 120 + (delay or 0), what=f"{n} tasks in {q}")
        cpu = broker_cpu() - cpu0
    finally:
        admin.delete(q)
    return {"tasks_per_s": n / confirmed, "broker_cpu_us_per_task": cpu / n * 1e6}


# --- the client inside WSGI servers ---------------------------------------------

class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def enqueue_app(client: Client, queue: str):
    """The view a web application writes, timing its own submit()."""
    def app(environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        t = time.perf_counter()
        message_id = client.submit(body, queue=queue)
        took = time.perf_counter() - t
        start_response("202 Accepted", [("Content-Type", "application/json")])
        return [json.dumps({"id": message_id, "pid": os.getpid(),
                            "submit_s": took}).encode()]
    return app


def post_all(port: int, requests: int, callers: int) -> list[dict]:
    def post(i):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=f"task {i}".encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            if r.status != 202:
                raise RuntimeError(f"request {i}: HTTP {r.status}")
            return json.loads(r.read())
    with concurrent.futures.ThreadPoolExecutor(callers) as pool:
        return list(pool.map(post, range(requests)))


def drain(queue: str, n: int) -> list[bytes]:
    """Everything on ``queue`` (consumed): until ``n`` came, then until none came for 2 s
    (so a duplicate would be seen too); gives up when none came for 30 s."""
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=500)
        bodies: list[bytes] = []
        idle_since = time.monotonic()
        for method, _, body in ch.consume(queue, inactivity_timeout=2):
            if method is None:
                if len(bodies) >= n or time.monotonic() - idle_since > 30:
                    break
                continue
            idle_since = time.monotonic()
            bodies.append(body)
            ch.basic_ack(method.delivery_tag)
        ch.cancel()
        return bodies
    finally:
        conn.close()


def threaded(queue: str, requests: int, callers: int) -> list[dict]:
    client = Client(URL, confirm_timeout=30)
    server = make_server("127.0.0.1", 0, enqueue_app(client, queue),
                         server_class=_ThreadingServer, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="wsgi", daemon=True)
    thread.start()
    try:
        return post_all(server.server_port, requests, callers)
    finally:
        server.shutdown()
        server.server_close()
        client.close()


def prefork(queue: str, requests: int, callers: int) -> list[dict]:
    client = Client(URL, confirm_timeout=30)
    client.submit(b"from the parent", queue=queue)   # its connection is open at the fork
    server = make_server("127.0.0.1", 0, enqueue_app(client, queue), handler_class=_Quiet)
    children = []
    for _ in range(callers):
        pid = os.fork()
        if pid == 0:   # a worker of the prefork server: serve until told to stop
            try:
                server.serve_forever()
            finally:
                os._exit(0)
        children.append(pid)
    try:
        return post_all(server.server_port, requests, callers)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
        server.server_close()
        client.close()


def wsgi(admin: Admin, requests: int, callers: int) -> dict:
    out = {"requests": requests, "callers": callers}
    for kind, serve in (("threaded", threaded), ("prefork", prefork)):
        q = queue_name(f"client-wsgi-{kind}")
        admin.declare(q, {"x-queue-type": "quorum"})
        try:
            t0 = time.perf_counter()
            answers = serve(q, requests, callers)
            took = time.perf_counter() - t0
            expect = [f"task {i}".encode() for i in range(requests)]
            if kind == "prefork":
                expect.append(b"from the parent")
            bodies = drain(q, len(expect))
        finally:
            admin.delete(q)
        ids = {a["id"] for a in answers}
        lost = len(set(expect) - set(bodies))
        twice = len(bodies) - len(set(bodies))
        submit = [a["submit_s"] for a in answers]
        out[kind] = {"answered": len(answers), "distinct_ids": len(ids),
                     "in_queue": len(bodies), "lost": lost, "twice": twice,
                     "serving_processes": len({a["pid"] for a in answers}),
                     "requests_per_s": round(requests / took),
                     "submit_p50_ms": round(percentile(submit, 50) * 1000, 3),
                     "submit_p99_ms": round(percentile(submit, 99) * 1000, 3),
                     "submit_max_ms": round(max(submit) * 1000, 3)}
        if len(ids) != requests or lost or twice or sorted(bodies) != sorted(expect):
            out[kind]["FAILED"] = "not every request confirmed once with its task in the queue"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--latency-tasks", type=int, default=2000)
    ap.add_argument("--per-process", type=int, default=30)
    ap.add_argument("--wsgi", action="store_true",
                    help="the client in a threaded and a prefork WSGI server instead")
    ap.add_argument("--requests", type=int, default=10000, help="per server (--wsgi)")
    ap.add_argument("--callers", type=int, default=8,
                    help="concurrent callers, and prefork worker processes (--wsgi)")
    args = ap.parse_args()
    if args.wsgi:
        admin = Admin()
        try:
            out = wsgi(admin, args.requests, args.callers)
        finally:
            admin.close()
        print(json.dumps(out, indent=2))
        sys.exit(1 if any("FAILED" in out[k] for k in ("threaded", "prefork")) else 0)
    admin = Admin()
    client = Client(URL)
    try:
        out = {"latency": latency(client, admin, args.latency_tasks, args.per_process),
               "plain": publish(client, admin, args.tasks, None),
               "delayed_2s": publish(client, admin, args.tasks, 2.0)}
    finally:
        client.close()
        admin.close()
    out["delayed_vs_plain_throughput"] = (out["delayed_2s"]["tasks_per_s"]
                                          / out["plain"]["tasks_per_s"])
    out["delayed_vs_plain_broker_cpu"] = (out["delayed_2s"]["broker_cpu_us_per_task"]
                                          / out["plain"]["broker_cpu_us_per_task"])
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
