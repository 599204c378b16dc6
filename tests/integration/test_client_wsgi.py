"""workqd.client inside the two kinds of web server a producer runs: one process with
threads, and a prefork server whose workers inherit the client from their parent.
Every request's task is confirmed once and none is lost. The full-size run (10,000
requests a server, submit() latency from inside the server) is
``bench/client.py --wsgi``."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socketserver
import threading
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from conftest import BROKER_URL, wait_for
from workqd.client import Client

REQUESTS = 2000
CALLERS = 8


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


def enqueue_app(client: Client, queue: str):
    """The view a web application writes: enqueue, answer 202 with the task's id."""
    def app(environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        message_id = client.submit(body, queue=queue)
        start_response("202 Accepted", [("Content-Type", "application/json")])
        return [json.dumps({"id": message_id, "pid": os.getpid()}).encode()]
    return app


def post_all(port: int) -> list[dict]:
    def post(i):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=f"task {i}".encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 202
            return json.loads(r.read())
    with concurrent.futures.ThreadPoolExecutor(CALLERS) as pool:
        return list(pool.map(post, range(REQUESTS)))


def drained(amqp, queue: str) -> list[bytes]:
    bodies: list[bytes] = []

    def enough():
        bodies.extend(b for _, b in amqp.get_all(queue))
        return len(bodies) >= REQUESTS
    wait_for(enough, 60, what=f"{REQUESTS} tasks")
    bodies.extend(b for _, b in amqp.get_all(queue))
    return bodies


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def test_a_threaded_server_shares_one_client(amqp, qname):
    amqp.declare(qname)
    client = Client(BROKER_URL, confirm_timeout=30)
    server = make_server("127.0.0.1", 0, enqueue_app(client, qname),
                         server_class=_ThreadingServer, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="wsgi", daemon=True)
    thread.start()
    try:
        answers = post_all(server.server_port)
    finally:
        server.shutdown()
        client.close()
    assert len({a["id"] for a in answers}) == REQUESTS
    bodies = drained(amqp, qname)
    assert sorted(bodies) == sorted(f"task {i}".encode() for i in range(REQUESTS))


def test_a_prefork_server_whose_workers_inherit_the_client(amqp, qname):
    amqp.declare(qname)
    client = Client(BROKER_URL, confirm_timeout=30)
    client.submit(b"from the parent", queue=qname)    # its connection is open at the fork
    server = make_server("127.0.0.1", 0, enqueue_app(client, qname), handler_class=_Quiet)
    children = []
    for _ in range(CALLERS):
        pid = os.fork()
        if pid == 0:   # a worker of the prefork server: serve until told to stop
            try:
                server.serve_forever()
            finally:
                os._exit(0)
        children.append(pid)
    try:
        answers = post_all(server.server_port)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
        server.server_close()
    assert len({a["id"] for a in answers}) == REQUESTS
    assert len({a["pid"] for a in answers} - {os.getpid()}) > 1   # served by several workers
    bodies = drained(amqp, qname)
    assert sorted(bodies) == sorted([b"from the parent",
                                     *(f"task {i}".encode() for i in range(REQUESTS))])
    client.submit(b"the parent's client still works", queue=qname)
    client.close()
