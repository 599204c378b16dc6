"""The master's control socket: line-delimited JSON over a Unix stream socket, served from its loop.

Like httpd.py, the server is a listening.Listener: its listening socket and each
client are registered with the master's selector (``key.data`` is a callable
taking the ready mask); the master calls ``expire(now)`` once per loop turn.
Nothing here blocks or raises into the loop: a hostile client costs one socket
and a bounded slice of a turn.

Protocol, version 1: each request is one line of JSON, an object
``{"v": 1, "cmd": NAME, ...arguments}``; each answer is one line,
``{"v": 1, "ok": true, ...}`` or ``{"v": 1, "ok": false, "error": "one line"}``.
A connection may send several requests; they are answered in order. A line
that is not such an object gets an error answer and the connection stays
usable; a line over MAX_REQUEST bytes gets an error answer and the connection
is closed (what follows cannot be framed).

Who may connect is the file system's business: the socket is mode 0660, group
``workqd`` when that group exists (else the daemon's own group), so root and
members of the group may control the daemon and anyone else gets EACCES.

Budget:
  MAX_CLIENTS = 16          open connections; the 17th evicts the oldest
  MAX_REQUEST = 4 KiB       one request line (the longest real one is ~100 bytes)
  MAX_DEPTH = 16            nesting of arrays and objects in a request
  MAX_OUTPUT = 4 MiB        answers not yet read by the client; beyond it, closed
  IDLE_TIMEOUT = 10 s       a connection with no complete request for this long is closed
  REQUESTS_PER_TURN = 16    answered per loop turn; the rest wait for the next turns
  ACCEPTS_PER_TURN = 8      accepts per readiness callback
"""

from __future__ import annotations

import errno
import grp
import json
import logging
import os
import selectors
import socket
import stat
import time
from typing import Callable

from .listening import Connection, Listener

log = logging.getLogger("workqd.control")

VERSION = 1
MAX_CLIENTS = 16
MAX_REQUEST = 4096
MAX_DEPTH = 16            # nesting of a request's arrays and objects (real ones: 1)
MAX_OUTPUT = 4 << 20
IDLE_TIMEOUT = 10.0
REQUESTS_PER_TURN = 16
ACCEPTS_PER_TURN = 8
ACCEPT_PAUSE = 0.5        # seconds without accepts after EMFILE (listening.py)
SOCKET_MODE = 0o660
SOCKET_GROUP = "workqd"
RUN_DIR = "/run/workqd"
SOCKET_NAME = "control.sock"


class ProtocolError(ValueError):
    """A request that cannot be acted on; its text is the error answer."""


# --- where the socket lives ----------------------------------------------

def _stem(config_path: str) -> str:
    base = os.path.basename(config_path)
    return base.rsplit(".", 1)[0] if "." in base else base


def run_dir_path(config_path: str) -> str:
    """/run/workqd/control.sock for workqd.yaml (workqd.service's RuntimeDirectory=),
    /run/workqd-NAME/control.sock for NAME.yaml (workqd@NAME.service's)."""
    # Side by side, never nested: systemd removes a unit's RuntimeDirectory= with
    # everything below it when the unit stops, so a directory inside /run/workqd
    # would vanish under a running workqd@NAME whenever workqd.service stops.
    stem = _stem(config_path)
    return os.path.join(RUN_DIR if stem == "workqd" else f"{RUN_DIR}-{stem}", SOCKET_NAME)


def beside_config_path(config_path: str) -> str:
    """Elsewhere: <config dir>/<config stem>.sock."""
    return os.path.join(os.path.dirname(os.path.abspath(config_path)),
                        f"{_stem(config_path)}.sock")


def server_path(configured: str | None, config_path: str, environ=os.environ) -> str:
    """The daemon's socket: control.socket; else $RUNTIME_DIRECTORY/control.sock (systemd);
    else run_dir_path() if its directory is writable; else beside_config_path()."""
    if configured:
        return configured
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return os.path.join(runtime, SOCKET_NAME)
    candidate = run_dir_path(config_path)
    if os.access(os.path.dirname(candidate), os.W_OK):
        return candidate
    return beside_config_path(config_path)


def client_paths(configured: str | None, config_path: str) -> list[str]:
    """Where workqctl looks, in order (it cannot see the daemon's environment)."""
    if configured:
        return [configured]
    return [run_dir_path(config_path), beside_config_path(config_path)]


# --- the protocol ----------------------------------------------------------

def nesting_depth(text: str) -> int:
    """How deep ``[`` and ``{`` nest in ``text``, brackets inside JSON strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def parse_request(line: bytes) -> dict:
    """One request line -> its object; ProtocolError saying what is wrong."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("request is not UTF-8") from None
    # json.loads recurses once per level: a line of 4,000 brackets would raise
    # RecursionError on the master's loop instead of getting an answer.
    if nesting_depth(text) > MAX_DEPTH:
        raise ProtocolError(f"request is nested too deep (more than {MAX_DEPTH} levels)")
    try:
        req = json.loads(text)
    except RecursionError:
        raise ProtocolError("request is nested too deep") from None
    except ValueError as e:
        raise ProtocolError(f"request is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise ProtocolError(f"request must be a JSON object, got {type(req).__name__}")
    if req.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {req.get('v')!r} (this daemon "
                            f"speaks v{VERSION})")
    cmd = req.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise ProtocolError("request has no \"cmd\" string")
    return req


def encode(answer: dict) -> bytes:
    return json.dumps({"v": VERSION, **answer}, separators=(",", ":"),
                      default=str).encode("utf-8") + b"\n"


def error(text: str) -> dict:
    return {"ok": False, "error": text}


def answer_line(line: bytes, app: Callable[[dict], dict]) -> bytes:
    """Parse, dispatch, encode; never raises (a failing app is an error answer)."""
    try:
        req = parse_request(line)
    except ProtocolError as e:
        return encode(error(str(e)))
    try:
        answer = app(req)
        if not isinstance(answer, dict):
            raise TypeError(f"the app returned {type(answer).__name__}, not a dict")
    except ProtocolError as e:
        return encode(error(str(e)))
    except Exception as e:
        log.exception("control: the command %r failed", req.get("cmd"))
        return encode(error(f"internal error: {type(e).__name__}: {e}"))
    try:
        return encode(answer)
    except (TypeError, ValueError) as e:
        log.error("control: the answer to %r cannot be encoded: %s", req.get("cmd"), e)
        return encode(error("internal error: answer cannot be encoded"))


# --- the server ----------------------------------------------------------------

class _Client(Connection):
    def __init__(self, server: "ControlServer", sock: socket.socket, now: float):
        self.server = server
        self.sock = sock
        self.buf = bytearray()
        self.out = bytearray()
        self.idle_deadline = now + IDLE_TIMEOUT
        self.closing = False   # the client sent EOF (or overflowed): close once answered
        self.truncated = False

    def name(self) -> str:
        return "control: connection"

    def on_ready(self, mask: int = 0) -> None:
        if self.closed:
            return
        try:
            self._write()
            if len(self.out) < MAX_OUTPUT:
                if self.closing:
                    self._answer_some()
                else:
                    self._read()
            if self.closing and not self.out and (b"\n" not in self.buf or self.truncated):
                self.close()
            elif not self.closed:
                self._rearm()
        except OSError as e:
            self.close(f"{type(e).__name__}: {e}")
        except Exception:
            log.exception("control: unexpected error, connection closed")
            self.close()

    def _read(self) -> None:
        """What is there now, within the request cap (a level-triggered loop brings more)."""
        if len(self.buf) <= MAX_REQUEST:   # else: answer what is there first
            try:
                data = self.sock.recv(MAX_REQUEST + 1)
            except BlockingIOError:
                data = None
            if data == b"":
                self.closing = True     # the client is done; answer what it sent,
                if self.buf.strip() and not self.buf.endswith(b"\n"):
                    self.buf += b"\n"  # a last request without its newline included
            elif data:
                self.buf += data
        self._answer_some()

    def _answer_some(self) -> None:
        while not self.closed:
            end = self.buf.find(b"\n")
            if end < 0:
                if len(self.buf) > MAX_REQUEST:
                    self._refuse_oversized()
                break
            if end > MAX_REQUEST:
                self._refuse_oversized()
                break
            if not self.server.take_budget():
                self.server.owed.add(self)   # answered next turn
                break
            line = bytes(self.buf[:end])
            del self.buf[:end + 1]
            self.idle_deadline = time.monotonic() + IDLE_TIMEOUT
            if line.strip():
                self.out += answer_line(line, self.server.app)
        self._write()

    def _refuse_oversized(self) -> None:
        # What follows cannot be framed: answer, then close.
        self.out += encode(error(f"request over {MAX_REQUEST} bytes"))
        self.buf.clear()
        self.closing = self.truncated = True

    def _write(self) -> None:
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                break
            del self.out[:sent]

    def _rearm(self) -> None:
        if self.out:
            events = selectors.EVENT_WRITE
        elif self.closing:
            events = 0   # at EOF, readable forever: wait for the next turn's budget (owed)
        else:
            events = selectors.EVENT_READ
        self._want(events)


class ControlServer(Listener):
    """Binds ``path`` at once (OSError to the caller) and serves ``app`` from ``sel``.

    ``app(request) -> dict`` answers one parsed request; it may raise ProtocolError."""

    def __init__(self, sel: selectors.BaseSelector, path: str, app: Callable[[dict], dict]):
        self.path = path
        self.app = app
        self.owed: set[_Client] = set()           # clients with requests left for next turn
        self._budget = REQUESTS_PER_TURN
        self._remove_stale(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)   # never a moment with a wider mode than 0660
        try:
            listener.bind(path)
            listener.listen(32)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        finally:
            os.umask(old_umask)
        self._ino = os.stat(path).st_ino
        self._set_group(path)
        os.chmod(path, SOCKET_MODE)
        super().__init__(sel, listener, log, "control", ACCEPTS_PER_TURN, ACCEPT_PAUSE)

    @staticmethod
    def _remove_stale(path: str) -> None:
        """A socket left by a killed daemon is removed; any other socket is refused."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} exists and is not a socket")
        # Only a refused connection proves nobody listens. A full backlog
        # (EAGAIN), EACCES or a timeout say nothing about that, and unlinking a
        # live daemon's socket would leave it unreachable for workqctl.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            err = probe.connect_ex(path)
        finally:
            probe.close()
        if err == errno.ECONNREFUSED:
            os.unlink(path)   # nobody listens: stale
            return
        if err == errno.ENOENT:
            return            # removed since the lstat
        # No errno on these: cli.py reads EADDRINUSE as the metrics port's.
        if err in (0, errno.EAGAIN, errno.EINPROGRESS):
            raise OSError(f"{path}: another workqd is listening there")
        raise OSError(f"{path}: cannot tell whether another workqd is listening there "
                      f"({os.strerror(err)}); remove it by hand if none is")

    @staticmethod
    def _set_group(path: str) -> None:
        try:
            gid = grp.getgrnam(SOCKET_GROUP).gr_gid
        except KeyError:
            return   # the socket keeps the daemon's group
        if os.stat(path).st_gid == gid:
            # The units run the daemon as group workqd, and their syscall
            # filter refuses chown even when it would change nothing.
            return
        try:
            os.chown(path, -1, gid)
        except OSError as e:
            log.warning("control: cannot give %s to group %s (%s); it keeps group %d",
                        path, SOCKET_GROUP, e.strerror, os.getgid())

    # --- the loop's calls ---------------------------------------------------

    def take_budget(self) -> bool:
        if self._budget <= 0:
            return False
        self._budget -= 1
        return True

    def expire(self, now: float) -> None:
        """Once per loop turn: a new budget, answers owed, idle clients closed."""
        self._budget = REQUESTS_PER_TURN
        try:
            owed, self.owed = self.owed, set()
            for client in owed:
                if not client.closed:
                    client.on_ready(0)
            for client in list(self._clients):
                # A client that does not read its answers gets one more IDLE_TIMEOUT.
                if now >= client.idle_deadline + (IDLE_TIMEOUT if client.out else 0):
                    client.close("idle")
            self._resume_accepts(now)
        except Exception:
            log.exception("control: unexpected error expiring connections")

    def stop(self) -> None:
        super().stop()
        try:   # only our own file: a successor may have bound the path meanwhile
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass

    # --- accepting (listening.py) ------------------------------------------------

    def _admit(self, sock: socket.socket, peer) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            oldest = next(iter(self._clients))
            oldest.close(f"evicted, {MAX_CLIENTS} clients open")
        client = _Client(self, sock, time.monotonic())
        self._clients[client] = None
        client.on_ready(selectors.EVENT_READ)

    def forget(self, client: _Client) -> None:
        super().forget(client)
        self.owed.discard(client)
