"""The master's HTTP endpoint: /metrics, /healthz, /readyz on metrics.listen."""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from .metrics import CONTENT_TYPE_LATEST, Exposition

if TYPE_CHECKING:
    from .master import Master

log = logging.getLogger("workqd.master")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, master: "Master"):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.master = master
        self.exposition = Exposition(master)
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        master = self.server.master
        if path == "/metrics":
            self._reply(200, self.server.exposition.render(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok = master.healthy()
            self._reply(200 if ok else 503, b"ok\n" if ok else b"master loop stalled or pool failed\n")
        elif path == "/readyz":
            ok, reason = master.readiness()
            self._reply(200 if ok else 503, f"{reason}\n".encode())
        else:
            self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

    def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args) -> None:
        log.debug("http %s %s", self.address_string(), fmt % args)


class HttpServer:
    def __init__(self, address: tuple[str, int], master: "Master"):
        self.address = address
        self._server = _Server(address, master)  # OSError (e.g. EADDRINUSE) goes to the caller
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.5}, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def close_in_child(self) -> None:
        # A worker must not hold the listening socket: after the master died it
        # would keep the port from the master that systemd starts next.
        self._server.socket.close()
