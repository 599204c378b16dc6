"""The metrics endpoint's server (workqd/httpd.py): protocol, budget and abuse, in-process.

A thread of the test plays the master's loop (select, call key.data, expire); the
test's own thread is the client. Run as a script, this file is a server process
driven the same way (for the EMFILE test here and the abuse test next door).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import resource
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workqd import httpd, webauth

METRICS = b"".join(b"workqd_tasks_processed_total{queue=\"q%d\",outcome=\"success\"} %d\n"
                   % (i, i * 7) for i in range(300))
BIG = 5_000_000


def app(request: httpd.Request) -> httpd.Response:
    if request.path == "/metrics":
        return httpd.Response(200, METRICS, "text/plain; version=0.0.4; charset=utf-8")
    if request.path == "/big":
        return httpd.Response(200, b"x" * BIG)
    if request.path == "/echo":
        return httpd.Response(200, json.dumps([request.method, request.path, request.query,
                                               request.headers]).encode())
    return httpd.Response(404, b"not found\n")


class Loop:
    """The master's side: one thread selecting and calling back, as the master's loop will."""

    def __init__(self, app_=app, **kwargs):
        self.calls: list[httpd.Request] = []
        self.sel = selectors.PollSelector()
        self.srv = httpd.HttpServer(self.sel, ("127.0.0.1", 0), self._counting(app_), **kwargs)
        self.port = self.srv.address[1]
        self.error: BaseException | None = None
        self.turns = 0
        self.peak_handshakes = 0  # the most TLS handshake steps in one turn
        self.resume()

    def resume(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop", daemon=True)
        self._thread.start()

    def _counting(self, app_):
        def counted(request):
            self.calls.append(request)
            return app_(request)
        return counted

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for key, mask in self.sel.select(0.05):
                    key.data(mask)
                self.peak_handshakes = max(self.peak_handshakes, self.srv.handshakes)
                self.srv.expire(time.monotonic())
                self.turns += 1
        except BaseException as e:  # an exception escaping a callback: the test fails
            self.error = e
            raise

    def halt(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()
        assert self.error is None, f"an exception escaped into the loop: {self.error!r}"


@pytest.fixture
def loops():
    started: list[Loop] = []

    def start(app_=app, **kwargs) -> Loop:
        started.append(Loop(app_, **kwargs))
        return started[-1]
    yield start
    for loop in started:
        loop.halt()
        loop.srv.stop()


def raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data``, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def get(port: int, path: str = "/metrics", headers: dict | None = None, context=None,
        method: str = "GET") -> tuple[int, dict, bytes]:
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("localhost", port, timeout=10, context=context)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def phases(loop: Loop) -> list[str]:
    """The server's clients' phases, read from the test's thread while the loop runs."""
    while True:
        try:
            return [c.phase for c in tuple(loop.srv._clients)]
        except RuntimeError:  # the loop changed the dict meanwhile
            continue


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return value


# --- protocol ------------------------------------------------------------

def test_get_head_and_404(loops):
    loop = loops()
    status, headers, body = get(loop.port)
    assert (status, body) == (200, METRICS)
    assert headers["content-length"] == str(len(METRICS))
    assert headers["connection"] == "close"
    assert headers["content-type"].startswith("text/plain; version=0.0.4")

    head = raw(loop.port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f"Content-Length: {len(METRICS)}\r\n".encode() in head
    assert head.endswith(b"\r\n\r\n"), "HEAD must send no body"

    old = raw(loop.port, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert status_of(old) == 200 and old.endswith(METRICS)

    assert get(loop.port, "/nothing")[0] == 404
    _, _, echo = get(loop.port, "/echo?a=1&b", headers={"X-Thing": "v"})
    method, path, query, seen = json.loads(echo)
    assert (method, path, query, seen["x-thing"]) == ("GET", "/echo", "a=1&b", "v")


def test_blank_lines_before_request_and_bare_newlines_are_accepted(loops):
    loop = loops()
    assert status_of(raw(loop.port, b"\r\n\r\nGET /metrics HTTP/1.0\n\n")) == 200


def test_a_pipelined_second_request_is_not_answered_and_does_not_reset_the_first(loops):
    loop = loops()
    reply = raw(loop.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"x" * 100_000)
    assert reply.count(b"HTTP/1.1 200 OK") == 1 and reply.endswith(METRICS)


def test_ipv6_listen_address():
    sel = selectors.PollSelector()
    srv = httpd.HttpServer(sel, ("::1", 0), app)
    try:
        with socket.create_connection(("::1", srv.address[1]), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = b""
            deadline = time.monotonic() + 10
            while not reply.endswith(METRICS) and time.monotonic() < deadline:
                for key, mask in sel.select(0.05):
                    key.data(mask)
                s.settimeout(0.01)
                try:
                    reply += s.recv(65536)
                except socket.timeout:
                    pass
        assert status_of(reply) == 200 and reply.endswith(METRICS)
    finally:
        srv.stop()
    assert not sel.get_map(), "stop() must unregister everything"


def test_a_taken_port_raises_to_the_caller():
    sel = selectors.PollSelector()
    srv = httpd.HttpServer(sel, ("127.0.0.1", 0), app)
    try:
        with pytest.raises(OSError):
            httpd.HttpServer(sel, srv.address, app)
    finally:
        srv.stop()


LONG_LINE = b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
MANY_HEADERS = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 100 + b"\r\n" * 1 \
    + b"".join(b"X-Pad%d: %s\r\n" % (i, b"p" * 100) for i in range(100)) + b"\r\n"


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /metrics\r\n\r\n", 400),
    (b"GET  /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\n\r\n", 400),                        # 1.1 without Host
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET http://x/metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /m\xc3\xa9trics HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    (b"GET /metrics HTTX/1.1\r\n\r\n", 400),
    (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    (b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"get /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (LONG_LINE, 414),
    (b"GET /" + b"a" * 5000, 414),        # no newline yet: refused without waiting for more
    (MANY_HEADERS, 431),
])
def test_unfit_requests_are_refused_without_calling_the_app(loops, request_bytes, status):
    loop = loops()
    reply = raw(loop.port, request_bytes)
    assert status_of(reply) == status, reply[:200]
    assert b"Connection: close\r\n" in reply
    if status == 405:
        assert b"Allow: GET, HEAD\r\n" in reply
    assert loop.calls == []
    assert get(loop.port)[0] == 200  # and the server goes on


REQUEST_PARTS = st.lists(st.sampled_from([
    b"GET", b"HEAD", b"POST", b" ", b"/", b"/metrics", b"?", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9",
    b"\r\n", b"\n", b"\r", b":", b"Host", b"Content-Length", b"0", b"7", b"\t", b"\x00", b"\xff",
    b"Authorization", b"Transfer-Encoding"]), max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(REQUEST_PARTS, st.binary(max_size=300)))
def test_any_head_parses_or_is_refused(head):
    try:
        request = httpd.parse_request(head)
    except httpd._Refused as refused:
        assert refused.response.status in (400, 414, 505)
    else:
        assert request.path.startswith("/") and request.method.isascii()
        assert all(name == name.lower() for name in request.headers)


def test_any_bytes_get_an_answer_or_a_close_and_never_break_the_loop(loops):
    loop = loops()

    @settings(max_examples=60, deadline=None)
    @given(st.one_of(REQUEST_PARTS, st.binary(max_size=300)))
    def check(data):
        calls_before = len(loop.calls)
        with socket.create_connection(("127.0.0.1", loop.port), timeout=10) as s:
            s.sendall(data + b"\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            reply = b""
            try:
                while chunk := s.recv(65536):
                    reply += chunk
            except ConnectionResetError:
                pass
        if data.strip(b"\r\n"):  # only blank lines then EOF get no answer
            assert reply.startswith(b"HTTP/1.1 ")
            assert status_of(reply) in (200, 400, 404, 405, 414, 431, 505)
        else:
            assert reply == b""
        for request in loop.calls[calls_before:]:
            assert request.method in ("GET", "HEAD") and request.path.startswith("/")
        assert loop.error is None
    check()


def test_app_errors_become_500_and_the_loop_goes_on(loops, caplog):
    caplog.set_level(logging.ERROR, logger="workqd.http")
    def broken(request):
        if request.path == "/raise":
            raise RuntimeError("boom")
        if request.path == "/header":
            return httpd.Response(200, b"", headers=(("X-Bad", "a\r\nSet-Cookie: x"),))
        return "not a response"
    loop = loops(broken)
    for path in ("/raise", "/header", "/type"):
        assert get(loop.port, path)[0] == 500
    reply = raw(loop.port, b"GET /header HTTP/1.0\r\n\r\n")
    assert status_of(reply) == 500 and b"Set-Cookie" not in reply
    failures = [r for r in caplog.records if r.name == "workqd.http"]
    assert len(failures) == 4 and failures[0].exc_info  # the app's bug, with its traceback


def test_sockets_are_non_blocking_and_close_on_exec_and_a_child_keeps_none(loops):
    loop = loops()
    idle = [socket.create_connection(("127.0.0.1", loop.port)) for _ in range(5)]
    for s in idle:
        s.sendall(b"GET /metr")
    wait_for(lambda: loop.srv.client_count() == 5, 10, "5 clients accepted")
    loop.halt()  # fork from a single-threaded process, as the master will
    fds = [loop.srv._listener.fileno(), *(c.sock.fileno() for c in loop.srv._clients)]
    for fd in fds:
        assert not os.get_blocking(fd) and not os.get_inheritable(fd)
    inodes = {os.fstat(fd).st_ino for fd in fds}
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: nothing but os calls, then out
        try:
            loop.srv.close_in_child()
            left = []
            for name in os.listdir("/proc/self/fd"):
                try:
                    left.append(os.readlink(f"/proc/self/fd/{name}"))
                except OSError:
                    pass
            os.write(write_end, json.dumps(left).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        left = json.loads(f.read())
    os.waitpid(pid, 0)
    child_sockets = {int(link[8:-1]) for link in left if link.startswith("socket:[")}
    assert child_sockets, "the child should still hold the test's own client sockets"
    assert not inodes & child_sockets, "the child kept a server socket"
    # The parent's server is untouched by the child's closing its copies.
    loop.resume()
    assert get(loop.port)[0] == 200
    wait_for(lambda: loop.srv.client_count() == 5, 10, "the answered client to be closed")
    for s in idle:
        s.close()


# --- budget --------------------------------------------------------------

def test_slowloris_is_closed_at_the_header_timeout_and_others_are_served(loops):
    limits = httpd.Limits(header_timeout=1.0, connection_deadline=3.0)
    loop = loops(limits=limits)
    started = time.monotonic()  # before the connect, so the server's clock starts later
    s = socket.create_connection(("127.0.0.1", loop.port))
    s.settimeout(0.2)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    served_meanwhile = False
    closed_at = None
    while time.monotonic() - started < 20:
        try:
            s.sendall(b"X-Drip: 1\r\n")
            if s.recv(1) == b"":
                closed_at = time.monotonic()
                break
        except socket.timeout:
            pass
        except (ConnectionResetError, BrokenPipeError):
            closed_at = time.monotonic()
            break
        if not served_meanwhile:
            served_meanwhile = get(loop.port)[0] == 200
    s.close()
    assert closed_at is not None, "a client dripping headers was never closed"
    assert closed_at - started >= limits.header_timeout
    assert served_meanwhile
    assert [c.path for c in loop.calls] == ["/metrics"]  # only the good client's


def test_a_client_that_never_reads_is_dropped_at_the_deadline(loops):
    limits = httpd.Limits(connection_deadline=4.0)
    loop = loops(limits=limits)
    lazy = socket.socket()
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect(("127.0.0.1", loop.port))
    lazy.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: loop.calls, 10, "the big request to reach the app")
    for _ in range(5):
        status, _, body = get(loop.port)
        assert (status, body) == (200, METRICS)
    # The answered clients go; the lazy one stays, its response half written.
    wait_for(lambda: phases(loop) == [httpd.WRITING], 10, "only the lazy client left")
    wait_for(lambda: loop.srv.client_count() == 0, 30, "the lazy client to be dropped")
    lazy.settimeout(10)
    received = 0
    try:
        while chunk := lazy.recv(1 << 20):
            received += len(chunk)
    except ConnectionResetError:
        pass
    lazy.close()
    assert received < BIG, "the whole response fit in the socket buffers: nothing was tested"


def test_cap_evicts_the_oldest_idle_client_so_a_real_request_gets_through(loops):
    limits = httpd.Limits(header_timeout=120.0, connection_deadline=120.0)  # eviction alone
    loop = loops(limits=limits)
    idle = []
    for _ in range(limits.max_clients + 50):
        s = socket.create_connection(("127.0.0.1", loop.port), timeout=10)
        s.sendall(b"GET /metr")
        idle.append(s)
    wait_for(lambda: loop.srv.client_count() == limits.max_clients, 10, "the cap to fill")
    try:
        assert get(loop.port)[0] == 200
        assert loop.srv.client_count() <= limits.max_clients
        # The first ones were evicted (they read EOF), the newest are still open.
        idle[0].settimeout(10)
        assert idle[0].recv(1) == b""
        idle[-1].settimeout(0.2)
        with pytest.raises(socket.timeout):
            idle[-1].recv(1)
    finally:
        for s in idle:
            s.close()
    assert loop.calls and all(c.path == "/metrics" for c in loop.calls)


def test_a_burst_of_requests_is_answered_a_few_per_turn(loops):
    loop = loops()
    turn_of_call = []
    loop.srv.app = lambda request: (turn_of_call.append(loop.turns), app(request))[1]
    loop.halt()  # the requests pile up in the backlog, as in a burst between two turns
    clients = [socket.create_connection(("127.0.0.1", loop.port), timeout=10) for _ in range(40)]
    for s in clients:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    loop.resume()
    for s in clients:
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        s.close()
        assert status_of(reply) == 200 and reply.endswith(METRICS)
    per_turn = max(turn_of_call.count(t) for t in set(turn_of_call))
    assert len(turn_of_call) == 40 and per_turn == httpd.APP_CALLS_PER_TURN


def test_client_reset_mid_response_logs_no_traceback(loops, caplog):
    caplog.set_level(logging.DEBUG, logger="workqd.http")
    loop = loops()
    for _ in range(5):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", loop.port))
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(1000)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST
    wait_for(lambda: loop.srv.client_count() == 0, 10, "reset clients to be closed")
    assert get(loop.port)[0] == 200
    records = [r for r in caplog.records if r.name == "workqd.http"]
    assert not [r for r in records if r.exc_info or r.levelno >= logging.WARNING]
    resets = [r for r in records if "ConnectionResetError" in r.getMessage()
              or "BrokenPipeError" in r.getMessage()]
    assert len(resets) == 5, [r.getMessage() for r in records]


# --- EMFILE: in a process of its own, with few file descriptors ----------------

def start_server(tmp_path: Path, **options) -> tuple[subprocess.Popen, int, Path]:
    """This file as a server process (see serve() below); returns it, its port and its log."""
    log_path = tmp_path / f"server-{len(list(tmp_path.glob('server-*')))}.log"
    proc = subprocess.Popen([sys.executable, __file__, json.dumps(options)],
                            stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {log_path.read_text()}")
    return proc, int(line.split()[1]), log_path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_emfile_pauses_accepts_without_spinning_and_recovers(tmp_path):
    proc, port, log_path = start_server(tmp_path, nofile=32, header_timeout=120,
                                        connection_deadline=120)
    held = []
    try:
        for _ in range(60):  # more than 32 fds: the rest wait in the backlog
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        wait_for(lambda: "cannot accept connections" in log_path.read_text(), 20,
                 "the EMFILE warning")
        before, started = cpu_seconds(proc.pid), time.monotonic()
        wait_for(lambda: time.monotonic() - started > 2.5, 10, "2.5 s to pass")
        used = cpu_seconds(proc.pid) - before
        print(f"\nEMFILE: {used:.2f} s of CPU in 2.5 s with accepts failing")
        assert used < 0.5, f"{used:.2f} s of CPU in 2.5 s out of file descriptors: a busy loop"
        # One warning for the whole time out of descriptors, not one per failed accept.
        text = log_path.read_text()
        assert text.count("cannot accept connections") == 1, text
        for s in held:
            s.close()
        held.clear()
        # Released, the backlog's closed connections are accepted in a rush: on a loaded
        # machine that can run out again, briefly, which is a new episode of its own.
        assert get(port)[0] == 200
        text = log_path.read_text()
        assert "accepting connections again" in text
        assert "Traceback" not in text
    finally:
        for s in held:
            s.close()
        proc.terminate()
        proc.wait(10)


# --- TLS -----------------------------------------------------------------

class TLS:
    def __init__(self, cert_file, key_file, client_ca_file=None):
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file


def self_signed(tmp_path: Path, name: str) -> tuple[str, str]:
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-keyout", str(key),
                    "-out", str(cert), "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}"],
                   check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture
def certs(tmp_path):
    return {"server": self_signed(tmp_path, "localhost"),
            "client": self_signed(tmp_path, "scraper")}


def client_context(certs, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=certs["server"][0])
    if with_cert:
        ctx.load_cert_chain(*certs["client"])
    return ctx


def test_tls_without_client_certificates(loops, certs):
    loop = loops(tls=TLS(*certs["server"]), limits=httpd.Limits(header_timeout=1.0))
    status, _, body = get(loop.port, context=client_context(certs, False))
    assert (status, body) == (200, METRICS)
    # Plain HTTP on the TLS port: refused at the handshake, the app never sees it.
    try:
        reply = raw(loop.port, b"GET /metrics HTTP/1.0\r\n\r\n")
    except ConnectionResetError:
        reply = b""
    assert b"200 OK" not in reply
    # A client that connects and never says hello is closed at the header timeout.
    silent = socket.create_connection(("127.0.0.1", loop.port), timeout=20)
    assert silent.recv(1) == b""
    silent.close()
    assert len(loop.calls) == 1


def test_tls_with_client_certificates(loops, certs):
    loop = loops(tls=TLS(*certs["server"], client_ca_file=certs["client"][0]))
    assert get(loop.port, context=client_context(certs, True))[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        get(loop.port, context=client_context(certs, False))
    assert len(loop.calls) == 1
    assert get(loop.port, context=client_context(certs, True))[0] == 200


def test_tls_handshakes_are_bounded_per_turn(loops, certs):
    limits = httpd.Limits(handshakes_per_turn=2)
    loop = loops(tls=TLS(*certs["server"]), limits=limits)
    loop.halt()  # the clients' hellos pile up, then arrive in one turn
    results = []
    clients = [threading.Thread(target=lambda: results.append(
        get(loop.port, context=client_context(certs, False))[0])) for _ in range(16)]
    for t in clients:
        t.start()
    wait_for(lambda: len(socket_peers(loop.port)) >= 16, 10, "16 connections in the backlog")
    loop.resume()
    for t in clients:
        t.join(60)
    assert results == [200] * 16
    assert loop.peak_handshakes == limits.handshakes_per_turn


def socket_peers(port: int) -> list[str]:
    """Established connections to ``port`` seen from the client side (ss would do the same)."""
    hexport = f"{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return [f[1] for f in (line.split() for line in lines)
            if f[2].endswith(":" + hexport) and f[3] == "01"]


# --- basic auth ----------------------------------------------------------

def hash_line(password: str, iterations: int = 100_000) -> str:
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)

    def b64(b):
        return base64.urlsafe_b64encode(b).decode().rstrip("=")
    return f"pbkdf2_sha256${iterations}${b64(salt)}${b64(digest)}"


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


USERS = (("prometheus", hash_line("s3cret")), ("other", hash_line("pässword")))


def test_verify_password_reads_the_hash_lines():
    assert webauth.verify_password(USERS[0][1], "s3cret")
    assert webauth.verify_password(USERS[1][1], "pässword")
    assert not webauth.verify_password(USERS[0][1], "s3cret ")
    for bad in ("", "pbkdf2_sha256$x$a$b", "md5$1$a$b", "pbkdf2_sha256$0$AA$AA", "a$b"):
        assert not webauth.verify_password(bad, "s3cret")


def test_basic_auth_good_bad_and_missing(loops):
    loop = loops(basic_auth=USERS)
    assert get(loop.port, headers=basic("prometheus", "s3cret"))[0] == 200
    assert get(loop.port, headers=basic("other", "pässword"))[0] == 200
    for headers in ({}, basic("prometheus", "wrong"), basic("nobody", "s3cret"),
                    {"Authorization": "Basic !!!"}, {"Authorization": "Bearer x"}):
        status, got, _ = get(loop.port, headers=headers)
        assert status == 401
        assert got["www-authenticate"] == 'Basic realm="workqd"'
    assert [c.headers.get("authorization") for c in loop.calls] == [
        basic("prometheus", "s3cret")["Authorization"], basic("other", "pässword")["Authorization"]]


def test_password_guessing_is_rate_limited_and_a_known_login_still_works(loops, monkeypatch):
    checks = []  # (password, seconds)
    real = webauth.verify_password

    def timed(line, password):
        started = time.monotonic()
        try:
            return real(line, password)
        finally:
            checks.append((password, time.monotonic() - started))
    monkeypatch.setattr(webauth, "verify_password", timed)
    loop = loops(basic_auth=USERS)
    assert get(loop.port, headers=basic("prometheus", "s3cret"))[0] == 200
    assert len(checks) == 1
    started = time.monotonic()
    for i in range(40):
        assert get(loop.port, headers=basic("prometheus", f"guess{i}"))[0] == 401
        # The login seen before is cached: answered while guesses are refused.
        assert get(loop.port, headers=basic("prometheus", "s3cret"))[0] == 200
    elapsed = time.monotonic() - started
    guesses = checks[1:]
    spent = sum(seconds for _, seconds in guesses)
    bound = httpd.AUTH_FAILURE_BURST + httpd.AUTH_FAILURE_SHARE * elapsed \
        + max(seconds for _, seconds in guesses)
    print(f"\n40 guesses in {elapsed:.1f} s: {len(guesses)} checked, {spent * 1000:.0f} ms "
          f"spent, bound {bound * 1000:.0f} ms")
    assert spent <= bound
    assert len(guesses) < 40
    # Once the guessing stops, a new login is checked again.
    wait_for(lambda: get(loop.port, headers=basic("other", "pässword"))[0] == 200, 20,
             "the rate limit to let a new login through")


def _login(port: int, user: str, password: str, source: str = "127.0.0.1") -> int:
    """One request from ``source`` (any 127/8 address is this host's): its status."""
    with socket.create_connection(("127.0.0.1", port), timeout=30,
                                  source_address=(source, 0)) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nAuthorization: %s\r\n\r\n"
                  % basic(user, password)["Authorization"].encode())
        return status_of(b"".join(iter(lambda: s.recv(65536), b"")))


def test_a_guessing_client_does_not_starve_the_first_logins_of_others(loops, monkeypatch):
    users = tuple((f"scraper{i}", webauth.hash_password(f"pw{i}")) for i in range(3))
    checks = []
    real = webauth.verify_password
    monkeypatch.setattr(webauth, "verify_password",
                        lambda line, password: (checks.append(password), real(line, password))[1])
    # The loop-wide budget is not what this test is about, and on a loaded machine a single
    # slow check (over 0.5 s) can exhaust it; the per-address budget alone must do the work.
    loop = loops(basic_auth=users, limits=httpd.Limits(auth_total_burst=30.0))
    guessed = []
    stop = threading.Event()

    def guess():   # about 100 guesses a second, from an address of its own
        while not stop.is_set():
            guessed.append(_login(loop.port, "scraper0", f"guess{len(guessed)}", "127.0.0.2"))
            time.sleep(0.01)
    guesser = threading.Thread(target=guess, daemon=True)
    guesser.start()
    try:
        wait_for(lambda: len(guessed) >= 50, 30, "the guesser's first 50 answers")
        # How many of the guesser's checks each first login waited behind, counted rather
        # than timed: the machine's load stretches every check alike.
        behind = []
        for i in range(3):   # each a first login, so none is cached
            before = len(checks)
            assert _login(loop.port, f"scraper{i}", f"pw{i}") == 200
            own = checks.index(f"pw{i}", before)
            behind.append(sum(1 for p in checks[before:own] if p.startswith("guess")))
    finally:
        stop.set()
        guesser.join(30)
    guesses = [p for p in checks if p.startswith("guess")]
    print(f"\n{len(guessed)} guesses, {len(guesses)} checked; the first logins waited "
          f"behind {behind} of the guesser's checks")
    assert set(guessed) == {401}
    assert len(guesses) < len(guessed) / 5          # the guesser is limited ...
    assert max(behind) <= 1, behind                 # ... and no one else waits for it


def test_a_cheap_hash_is_read_with_one_warning_and_hash_password_makes_600000(loops, caplog):
    caplog.set_level(logging.WARNING, logger="workqd.http")
    weak = (("old", webauth.hash_password("pw", iterations=1000)),
            ("new", webauth.hash_password("pw")))
    loop = loops(basic_auth=weak)
    assert get(loop.port, headers=basic("old", "pw"))[0] == 200
    assert get(loop.port, headers=basic("new", "pw"))[0] == 200
    lines = [r.getMessage() for r in caplog.records if "iterations" in r.getMessage()]
    assert lines == ["http: metrics.basic_auth.old: the hash has 1000 PBKDF2 iterations, fewer "
                     "than 100000: make a new one with workqd hash-password (600000)"]
    r = subprocess.run([sys.executable, "-m", "workqd.cli", "hash-password"], input=b"s3cret\n",
                       capture_output=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    assert r.returncode == 0, r.stderr
    line = r.stdout.decode().strip()
    assert line.startswith("pbkdf2_sha256$600000$") and webauth.verify_password(line, "s3cret")


def test_at_most_one_password_check_per_turn(loops, monkeypatch):
    # Budgets large enough that no check is refused, per address or in all (on a loaded
    # machine five slow checks can exceed the loop's default share): this is about turns.
    loop = loops(basic_auth=USERS, limits=httpd.Limits(auth_failure_burst=30.0,
                                                       auth_total_burst=30.0))
    turn_of_check = []
    real = webauth.verify_password
    monkeypatch.setattr(webauth, "verify_password",
                        lambda line, password: (turn_of_check.append(loop.turns),
                                                real(line, password))[1])
    loop.halt()  # logins pile up in the backlog and arrive in one turn
    def request(password):
        return b"GET /metrics HTTP/1.0\r\nAuthorization: %s\r\n\r\n" % \
            basic("prometheus", password)["Authorization"].encode()
    clients = [socket.create_connection(("127.0.0.1", loop.port), timeout=10) for _ in range(4)]
    for s in clients:
        s.sendall(request("wrong"))
    good = socket.create_connection(("127.0.0.1", loop.port), timeout=10)
    good.sendall(request("s3cret"))
    loop.resume()
    replies = []
    for s in [*clients, good]:
        with s:
            replies.append(b"".join(iter(lambda: s.recv(65536), b"")))
    assert [status_of(r) for r in replies] == [401] * 4 + [200]
    assert len(turn_of_check) == 5 and len(set(turn_of_check)) == 5, turn_of_check


# --- the server process ----------------------------------------------------

def serve(options: dict) -> None:
    """Serve ``app`` on a free port from a select loop until SIGTERM; print the port."""
    if "nofile" in options:
        resource.setrlimit(resource.RLIMIT_NOFILE, (options["nofile"], options["nofile"]))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    limits = httpd.Limits(**{k: v for k, v in options.items() if k != "nofile"})
    sel = selectors.PollSelector()
    srv = httpd.HttpServer(sel, ("127.0.0.1", 0), app, limits=limits)
    print("PORT", srv.address[1], flush=True)
    longest = longest_cpu = 0.0  # the longest turn, select's wait excluded
    while not stopping:
        events = sel.select(1.0)
        started, cpu = time.monotonic(), time.thread_time()
        for key, mask in events:
            key.data(mask)
        srv.expire(time.monotonic())
        longest = max(longest, time.monotonic() - started)
        longest_cpu = max(longest_cpu, time.thread_time() - cpu)
    srv.stop()
    print(f"longest loop turn {longest * 1000:.1f} ms ({longest_cpu * 1000:.1f} ms of CPU)",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
