"""The master's HTTP endpoint: a non-blocking, single-threaded server the master's loop drives.

The master owns a selector; the server registers its listening socket and each
client with it, ``key.data`` being a callable taking the ready mask. The master
calls those, and ``expire(now)`` once per loop turn. No thread, no blocking call:
a slow, idle or hostile client costs one socket, a few KiB and a bounded slice of
a loop turn (the per-turn budgets below).

Budget (``Limits`` holds them; the defaults are these constants):
  MAX_CLIENTS = 64          open client connections; the 65th evicts the oldest
                            client that has no complete request yet
  HEADER_TIMEOUT = 5 s      from accept to a complete request head (TLS handshake included)
  CONNECTION_DEADLINE = 10 s  from accept to the last byte of the response written
  LISTEN_BACKLOG = 128      connections the kernel queues before we accept them
  MAX_REQUEST_LINE = 4 KiB  longer: 414
  MAX_REQUEST_HEAD = 8 KiB  request line and headers; longer: 431
  ACCEPTS_PER_TURN = 8      accepts per readiness callback, so a flood cannot starve the loop
  APP_CALLS_PER_TURN = 4    requests answered per loop turn; the rest wait for the next turns
  HANDSHAKES_PER_TURN = 8   TLS handshake steps per loop turn, likewise
  ACCEPT_PAUSE = 0.5 s      accepts stop this long after EMFILE/ENFILE (one warning per episode)
  AUTH_FAILURE_SHARE = 10 %, AUTH_FAILURE_BURST = 0.25 s
                            loop time that failed password checks (PBKDF2) may take,
                            over time and at once; beyond it a login not seen to
                            succeed before gets 401 unchecked. One check per turn at most.
  AUTH_CACHE_SIZE = 32      (user, password digest) pairs remembered as good

Eviction, when a new client finds MAX_CLIENTS open: first one already answered
(half-closed, waiting for the client's FIN), else the oldest that has not sent a
complete request, else the oldest waiting for or receiving its response. The
newest connection is always served, so idle connections cannot lock a scraper
out. Under a sustained password-guessing flood, a login never seen before may
get 401 until the flood ebbs.

One request per connection (``Connection: close``), GET and HEAD only, no body.
A plain connection is half-closed after the response and read until the client
closes (so unread input cannot turn the close into a reset that eats the response).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http
import logging
import re
import selectors
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable

from . import webauth
from .listening import Connection, Listener

log = logging.getLogger("workqd.http")

# 64 parallel scrapers is far more than any setup has, and far below the 1024
# open files systemd gives a unit by default, which the master needs for its workers.
MAX_CLIENTS = 64
# A scraper sends its request at once; 5 s leaves room for a loaded machine, TLS included.
HEADER_TIMEOUT = 5.0
# Prometheus' default scrape timeout is 10 s: a response not written by then is not awaited.
CONNECTION_DEADLINE = 10.0
# Above MAX_CLIENTS, so a burst of scrapers waits in the kernel rather than being refused.
LISTEN_BACKLOG = 128
# Limits as common servers have them (nginx 8 KiB); our URLs are short, headers few.
MAX_REQUEST_LINE = 4096
MAX_REQUEST_HEAD = 8192
# Bounds one accept callback; with eviction of the oldest, a client accepted now
# survives at least MAX_CLIENTS / ACCEPTS_PER_TURN turns, plenty to send its request.
ACCEPTS_PER_TURN = 8
# A scrape renders the metrics in the master loop: a flood of complete requests
# (up to MAX_CLIENTS at once) must not make one turn last 64 renders.
APP_CALLS_PER_TURN = 4
# The server's signature in a TLS handshake costs up to a few ms (RSA); the same
# bound for 64 clients handshaking at once.
HANDSHAKES_PER_TURN = 8
# Out of file descriptors, accepts pause this long (listening.py says why).
ACCEPT_PAUSE = 0.5
# Each failed password check costs a PBKDF2 run in the master loop (50 ms at 100,000
# iterations here, 300 ms at 600,000): token buckets of loop seconds, so the bound
# holds whatever iteration count the hashes were made with. Each client address
# has its own bucket, so one guessing client runs out alone and the first login
# of another is still checked; all addresses together have a larger one, which
# bounds the loop's share when many addresses guess. A login that once
# succeeded is cached and never limited.
AUTH_FAILURE_SHARE = 0.1        # per client address
AUTH_FAILURE_BURST = 0.25
AUTH_TOTAL_SHARE = 0.3          # every address together
AUTH_TOTAL_BURST = 0.75
AUTH_CLIENTS = 1024             # addresses with a bucket; full buckets are forgotten first
AUTH_CACHE_SIZE = 32
# A lingering close reads at most this much per callback before waiting again.
DRAIN_PER_TURN = 65536
# Once limiting starts, one warning per this many seconds, not one per attempt.
AUTH_WARNING_INTERVAL = 60.0

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_RESPONSE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_UNIQUE_HEADERS = {"host", "authorization", "content-length"}


@dataclass(frozen=True)
class Limits:
    max_clients: int = MAX_CLIENTS
    header_timeout: float = HEADER_TIMEOUT
    connection_deadline: float = CONNECTION_DEADLINE
    backlog: int = LISTEN_BACKLOG
    max_request_line: int = MAX_REQUEST_LINE
    max_request_head: int = MAX_REQUEST_HEAD
    accepts_per_turn: int = ACCEPTS_PER_TURN
    app_calls_per_turn: int = APP_CALLS_PER_TURN
    handshakes_per_turn: int = HANDSHAKES_PER_TURN
    accept_pause: float = ACCEPT_PAUSE
    auth_failure_share: float = AUTH_FAILURE_SHARE
    auth_failure_burst: float = AUTH_FAILURE_BURST
    auth_total_share: float = AUTH_TOTAL_SHARE
    auth_total_burst: float = AUTH_TOTAL_BURST
    auth_clients: int = AUTH_CLIENTS
    auth_cache_size: int = AUTH_CACHE_SIZE


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # names in lower case; repeated headers joined with ", "


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())


App = Callable[[Request], Response]


class _Refused(Exception):
    """A request the server answers itself, without calling the app."""

    def __init__(self, status: int, why: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(why)
        self.response = Response(status, f"{http.HTTPStatus(status).phrase}: {why}\n".encode(),
                                 headers=headers)


def parse_request(head: bytes, limits: Limits = Limits()) -> Request:
    """Parse a complete request head (request line and headers); raise _Refused if it is unfit."""
    lines = head.split(b"\n")
    request_line = lines[0].removesuffix(b"\r")
    if len(request_line) > limits.max_request_line:
        raise _Refused(414, f"request line over {limits.max_request_line} bytes")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise _Refused(400, "malformed request line")
    method, target, version = parts
    v = _VERSION.fullmatch(version)
    if v is None:
        raise _Refused(400, "malformed HTTP version")
    if v[1] != b"1":
        raise _Refused(505, "only HTTP/1.0 and HTTP/1.1")
    if not _TARGET.fullmatch(target):
        raise _Refused(400, "the target must be a path")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        line = raw.removesuffix(b"\r")
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            raise _Refused(400, "obsolete header line folding")
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon or not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise _Refused(400, "malformed header line")
        key, text = name.decode("ascii").lower(), value.decode("latin-1")
        if key not in headers:
            headers[key] = text
        elif key in _UNIQUE_HEADERS:
            raise _Refused(400, f"repeated {key} header")
        else:
            headers[key] += ", " + text
    if v[2] != b"0" and "host" not in headers:
        raise _Refused(400, "HTTP/1.1 needs a Host header")
    # Reading a body is not worth it for GET; refusing it keeps "complete" simple.
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        raise _Refused(400, "no request body accepted")
    path, _, query = target.decode("ascii").partition("?")
    return Request(method.decode("ascii"), path, query, headers)


def _too_large(buf: bytes, limits: Limits) -> _Refused:
    line_end = buf.find(b"\n")
    if line_end < 0 or line_end > limits.max_request_line:
        return _Refused(414, f"request line over {limits.max_request_line} bytes")
    return _Refused(431, f"request head over {limits.max_request_head} bytes")


def render(response: Response, head_only: bool) -> bytes:
    """The bytes on the wire; ValueError for a status or header that cannot be sent."""
    if not 100 <= response.status <= 599:
        raise ValueError(f"bad status {response.status!r}")
    try:
        reason = http.HTTPStatus(response.status).phrase
    except ValueError:
        reason = ""
    if not isinstance(response.body, (bytes, bytearray, memoryview)):
        raise TypeError(f"body is {type(response.body).__name__}, not bytes")
    body = bytes(response.body)
    fields = [("Content-Type", response.content_type), ("Content-Length", str(len(body))),
              ("Connection", "close"), *response.headers]
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    for name, value in fields:
        if not _TOKEN.fullmatch(name.encode("latin-1")) or _BAD_RESPONSE_VALUE.search(value):
            raise ValueError(f"bad response header {name!r}")
        lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def _server_context(tls) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # as Prometheus' exporter toolkit
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=tls.client_ca_file)
    return ctx


class _Bucket:
    """Loop seconds that failed password checks may still take; refills at ``share``/s."""

    def __init__(self, burst: float, now: float):
        self.level = burst
        self.refilled = now

    def refill(self, share: float, burst: float, now: float) -> float:
        self.level = min(burst, self.level + (now - self.refilled) * share)
        self.refilled = now
        return self.level


class _BasicAuth:
    """Checks ``Authorization: Basic``; bounds the PBKDF2 work a guessing client can cause."""

    def __init__(self, users: tuple[tuple[str, str], ...], limits: Limits):
        self.users = dict(users)
        self.limits = limits
        self._good: dict[tuple[str, bytes], None] = {}  # insertion-ordered: oldest first
        now = time.monotonic()
        self._total = _Bucket(limits.auth_total_burst, now)
        self._clients: dict[str, _Bucket] = {}          # address -> its bucket, oldest first
        self._warned = -AUTH_WARNING_INTERVAL
        self.checked_this_turn = False
        for user, line in users:
            weak = webauth.weakness(line)
            if weak:
                log.warning("http: metrics.basic_auth.%s: %s", user, weak)

    def check(self, header: str | None, now: float, address: str = "") -> bool | None:
        """True or False; None when a password check is due and this turn already had one."""
        credentials = self._credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        key = (user, hashlib.sha256(password.encode("utf-8")).digest())
        if key in self._good:
            return True
        if self.checked_this_turn:
            return None
        limits = self.limits
        bucket = self._bucket(address, now)
        if bucket.refill(limits.auth_failure_share, limits.auth_failure_burst, now) <= 0:
            return False   # this address guessed enough for now; others are unaffected
        if self._total.refill(limits.auth_total_share, limits.auth_total_burst, now) <= 0:
            if now - self._warned >= AUTH_WARNING_INTERVAL:
                self._warned = now
                log.warning("http: failed logins are taking over %.0f%% of the loop: refusing "
                            "logins not seen before unchecked for now",
                            limits.auth_total_share * 100)
            return False
        self.checked_this_turn = True
        # An unknown user costs as much as a known one, so timing tells no user names.
        hash_line = self.users.get(user) or next(iter(self.users.values()))
        started = time.monotonic()
        ok = webauth.verify_password(hash_line, password) and user in self.users
        if not ok:
            spent = time.monotonic() - started
            bucket.level -= spent
            self._total.level -= spent
            return False
        self._good[key] = None
        if len(self._good) > limits.auth_cache_size:
            del self._good[next(iter(self._good))]
        return True

    def _bucket(self, address: str, now: float) -> _Bucket:
        bucket = self._clients.get(address)
        if bucket is not None:
            return bucket
        if len(self._clients) >= self.limits.auth_clients:
            self._forget_clients(now)
        bucket = self._clients[address] = _Bucket(self.limits.auth_failure_burst, now)
        return bucket

    def _forget_clients(self, now: float) -> None:
        """Make room: drop the buckets that refilled (they are as good as new), else the
        oldest half (a flood of addresses is bounded by the total bucket instead)."""
        limits = self.limits
        full = [a for a, b in self._clients.items()
                if b.refill(limits.auth_failure_share, limits.auth_failure_burst, now)
                >= limits.auth_failure_burst]
        for address in full:
            del self._clients[address]
        if len(self._clients) >= limits.auth_clients:
            for address in list(self._clients)[:len(self._clients) // 2 + 1]:
                del self._clients[address]

    @staticmethod
    def _credentials(header: str | None) -> tuple[str, str] | None:
        scheme, _, blob = (header or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(blob.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeError):
            return None
        user, colon, password = decoded.partition(":")
        return (user, password) if colon else None


# A client's phases, in order; eviction prefers the ones finished or not yet started.
HANDSHAKE, READING, QUEUED, WRITING, DRAINING = (
    "handshake", "reading", "queued", "writing", "draining")


class _Client(Connection):
    """One connection, from accept to close; every method runs in the master loop."""

    def __init__(self, server: "HttpServer", sock: socket.socket, peer: str, now: float):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.phase = HANDSHAKE if isinstance(sock, ssl.SSLSocket) else READING
        self.header_deadline = now + server.limits.header_timeout
        self.deadline = now + server.limits.connection_deadline
        self.buf = bytearray()
        self.start = 0  # where the request line begins in buf, after blank lines
        self.request: Request | None = None  # while QUEUED
        self.out = memoryview(b"")

    def name(self) -> str:
        return f"http {self.peer} ({self.phase})"

    def expired(self, now: float) -> str | None:
        if now >= self.deadline:
            return "connection deadline"
        if self.phase in (HANDSHAKE, READING) and now >= self.header_deadline:
            return "header timeout"
        return None

    def on_ready(self, mask: int = 0) -> None:
        """The selector callback: runs the connection as far as it goes without blocking."""
        if self.closed:
            return  # closed earlier in the same batch of events
        try:
            why = self.expired(time.monotonic())
            if why:
                self.close(why)
            else:
                self._advance()
        except OSError as e:  # resets, EPIPE, TLS errors: the client's doing, not ours
            self.close(f"{type(e).__name__}: {e}")
        except Exception:
            log.exception("http %s: unexpected error, connection closed", self.peer)
            self.close()

    def _advance(self) -> None:
        if self.phase == HANDSHAKE and not self._handshake():
            return
        if self.phase == READING and not self._read_request():
            return
        if self.phase == QUEUED and not self._answer():
            return
        if self.phase == WRITING and not self._write():
            return
        if self.phase == DRAINING:
            self._drain()

    def _handshake(self) -> bool:
        if self.server.handshakes >= self.server.limits.handshakes_per_turn:
            return self._want(selectors.EVENT_WRITE)  # next turn, as in _answer
        self.server.handshakes += 1
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return self._want(selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            return self._want(selectors.EVENT_WRITE)
        self.phase = READING
        return True

    def _read_request(self) -> bool:
        limits = self.server.limits
        while True:
            try:
                # Never more than the limit allows: the loop ends within 8 KiB.
                data = self.sock.recv(limits.max_request_head + 1 - len(self.buf))
            except (BlockingIOError, ssl.SSLWantReadError):
                return self._want(selectors.EVENT_READ)
            except ssl.SSLWantWriteError:
                return self._want(selectors.EVENT_WRITE)
            if not data:
                self.close("closed before a complete request")
                return False
            old = len(self.buf)
            self.buf += data
            if self.start == old:  # blank lines before a request are allowed (RFC 9112 2.2)
                self.start = len(self.buf) - len(self.buf.lstrip(b"\r\n"))
            # A terminator ending in the new data starts at most 3 bytes before it.
            end = _HEAD_END.search(self.buf, max(self.start, old - 3))
            if end is not None and end.end() <= limits.max_request_head:
                self._respond(bytes(self.buf[self.start:end.start()]))
                return True
            line_end = self.buf.find(b"\n", self.start, self.start + limits.max_request_line + 1)
            if len(self.buf) >= limits.max_request_head \
                    or line_end < 0 and len(self.buf) - self.start > limits.max_request_line:
                self._reply(_too_large(bytes(self.buf[self.start:]), limits).response, False,
                            "?", "?")
                return True

    def _respond(self, head: bytes) -> None:
        try:
            self.request = parse_request(head, self.server.limits)
        except _Refused as refused:
            self._reply(refused.response, False, "?", "?")
            return
        self.phase = QUEUED

    def _answer(self) -> bool:
        response = self.server.handle(self.request, self.peer.rpartition(":")[0])
        if response is None:
            # No budget left this turn. A connected socket is writable at once, so
            # waiting for that brings us back next turn without a timer.
            return self._want(selectors.EVENT_WRITE)
        self._reply(response, self.request.method == "HEAD", self.request.method,
                    self.request.path)
        self.request = None
        return True

    def _reply(self, response: Response, head_only: bool, method: str, path: str) -> None:
        try:
            data = render(response, head_only)
        except (ValueError, TypeError) as e:
            log.error("http: the app's response to %s %s cannot be sent: %s", method, path, e)
            response = Response(500, b"Internal Server Error\n")
            data = render(response, head_only)
        log.debug("http %s %s %s -> %d, %d bytes", self.peer, method, path, response.status,
                  len(data))
        self.buf.clear()
        self.out = memoryview(data)
        self.phase = WRITING

    def _write(self) -> bool:
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, ssl.SSLWantWriteError):
                return self._want(selectors.EVENT_WRITE)
            except ssl.SSLWantReadError:
                return self._want(selectors.EVENT_READ)
            self.out = self.out[sent:]
        if isinstance(self.sock, ssl.SSLSocket):
            self.close()
            return False
        # Lingering close: closing with unread input (say a pipelined request) would
        # send a reset that can destroy the response before the client read it.
        self.sock.shutdown(socket.SHUT_WR)
        self.phase = DRAINING
        return True

    def _drain(self) -> None:
        drained = 0
        while drained < DRAIN_PER_TURN:
            try:
                data = self.sock.recv(DRAIN_PER_TURN)
            except BlockingIOError:
                break
            if not data:
                self.close()
                return
            drained += len(data)
        self._want(selectors.EVENT_READ)


def _peer_name(peer) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return str(peer)


class HttpServer(Listener):
    """Listens on ``address`` at once (OSError to the caller) and serves ``app`` from ``sel``."""

    def __init__(self, sel: selectors.BaseSelector, address: tuple[str, int], app: App,
                 tls=None, basic_auth: tuple[tuple[str, str], ...] = (),
                 limits: Limits = Limits()):
        self.app = app
        self.limits = limits
        self._ssl = _server_context(tls) if tls is not None else None
        self._auth = _BasicAuth(tuple(basic_auth), limits) if basic_auth else None
        self._handled = 0         # requests handled this loop turn
        self.handshakes = 0       # TLS handshake steps this loop turn
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)  # close-on-exec (PEP 446)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(limits.backlog)
            listener.setblocking(False)
            super().__init__(sel, listener, log, "http", limits.accepts_per_turn,
                             limits.accept_pause)
        except BaseException:
            listener.close()
            raise

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.getsockname()[:2]

    # --- the loop's calls ------------------------------------------------

    def expire(self, now: float) -> None:
        """Once per loop turn: close clients past their deadlines, re-arm accepts after an
        EMFILE pause, and open the next turn's budgets (answers, handshakes, a password check)."""
        self._handled = self.handshakes = 0  # a new turn
        if self._auth is not None:
            self._auth.checked_this_turn = False
        try:
            for client in list(self._clients):
                why = client.expired(now)
                if why:
                    client.close(why)
            self._resume_accepts(now)
        except Exception:
            log.exception("http: unexpected error expiring connections")

    # --- accepting (listening.py) ------------------------------------------

    def _admit(self, sock: socket.socket, peer) -> None:
        peer = _peer_name(peer)
        if len(self._clients) >= self.limits.max_clients:
            self._evict()
        if self._ssl is not None:
            try:
                sock = self._ssl.wrap_socket(sock, server_side=True,
                                             do_handshake_on_connect=False)
            except OSError as e:
                log.debug("http %s: closed (%s)", peer, e)
                sock.close()
                return
        client = _Client(self, sock, peer, time.monotonic())
        self._clients[client] = None
        # Most clients send their request with the connection: serve it now.
        client.on_ready(selectors.EVENT_READ)

    def _evict(self) -> None:
        """Close one client: see the module docstring for which."""
        for phases in ((DRAINING,), (HANDSHAKE, READING), (QUEUED, WRITING)):
            for client in self._clients:
                if client.phase in phases:
                    client.close(f"evicted, {self.limits.max_clients} clients open")
                    return

    # --- answering -------------------------------------------------------

    def handle(self, request: Request, address: str = "") -> Response | None:
        """Method and auth checks, then the app; None when this turn's budget is spent."""
        if self._handled >= self.limits.app_calls_per_turn:
            return None
        if request.method not in ("GET", "HEAD"):
            self._handled += 1
            return _Refused(405, f"{request.method} (use GET or HEAD)",
                            (("Allow", "GET, HEAD"),)).response
        if self._auth is not None:
            verdict = self._auth.check(request.headers.get("authorization"), time.monotonic(),
                                       address)
            if verdict is None:
                return None
            if not verdict:
                self._handled += 1
                return Response(401, b"Unauthorized\n",
                                headers=(("WWW-Authenticate", 'Basic realm="workqd"'),))
        self._handled += 1
        try:
            response = self.app(request)
            if not isinstance(response, Response):
                raise TypeError(f"the app returned {type(response).__name__}, not a Response")
        except Exception:
            log.exception("http: the app failed on %s %s", request.method, request.path)
            return Response(500, b"Internal Server Error\n")
        return response
