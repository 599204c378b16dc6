"""A listening socket served from the master's selector: what httpd.py and control.py share.

The master has one thread (master.py forks only from it), so its servers are
callbacks on its selector (``key.data`` is a callable taking the ready mask).
This class owns what every such server needs: the table of open clients,
accepts in bounded batches, the accept pause after EMFILE and its one warning
per episode, closing everything on stop and, in a forked child, dropping the
copies without touching the shared selector. A subclass turns an accepted
socket into a client (``_admit``), a ``Connection``, which forgets itself as it
closes.

Everything here runs on the master's loop thread; nothing blocks or raises into it.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import time

# Out of file descriptors (or kernel memory), the listening socket stays readable:
# without a pause, a level-triggered loop would spin on accept.
ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Errors from accept that concern one client that already went away.
ACCEPT_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ETIMEDOUT,
                              errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNRESET})


class Listener:
    def __init__(self, sel: selectors.BaseSelector, listener: socket.socket, log: logging.Logger,
                 name: str, accepts_per_turn: int, accept_pause: float):
        """``listener``: bound, listening and non-blocking; registered here, last, so a
        subclass finishes setting it up (mode, owner) before the first accept."""
        self.sel = sel
        self._log = log
        self._name = name                      # the prefix of log lines: "http", "control"
        self._accepts_per_turn = accepts_per_turn
        self._accept_pause = accept_pause
        self._clients: dict = {}               # client -> None, insertion-ordered: oldest first
        self._paused_until = 0.0               # > 0 while accepts are off after EMFILE
        self._exhausted = False                # in an EMFILE episode (one warning each)
        self._listener = listener
        sel.register(listener, selectors.EVENT_READ, self._on_accept)

    def client_count(self) -> int:
        return len(self._clients)

    def forget(self, client) -> None:
        """A client closed (it calls this itself)."""
        self._clients.pop(client, None)

    def _resume_accepts(self, now: float) -> None:
        """From the subclass's ``expire(now)``, once per loop turn: accepts back on after a pause."""
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self.sel.register(self._listener, selectors.EVENT_READ, self._on_accept)

    def close_in_child(self) -> None:
        """In a forked child: drop every socket without touching the (shared) selector."""
        # A child holding them would keep the port, the socket path or a client's
        # connection after the master is gone; closing a copy sends nothing.
        for client in self._clients:
            client.closed = True
            client.sock.close()
        self._clients.clear()
        self._listener.close()

    def stop(self) -> None:
        for client in list(self._clients):
            client.close()
        if not self._paused_until:
            try:
                self.sel.unregister(self._listener)
            except (KeyError, ValueError):
                pass
        self._paused_until = 0.0
        self._listener.close()

    # --- accepting ------------------------------------------------------------

    def _admit(self, sock: socket.socket, peer) -> None:
        """A new connection (non-blocking already): make it a client, in ``_clients``."""
        raise NotImplementedError

    def _on_accept(self, mask: int = 0) -> None:
        try:
            self._accept_some()
        except Exception:
            self._log.exception("%s: unexpected error accepting connections", self._name)
            self._pause()

    def _accept_some(self) -> None:
        for _ in range(self._accepts_per_turn):
            try:
                sock, peer = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in ACCEPT_EXHAUSTED:
                    self._pause(e)
                    return
                if e.errno in ACCEPT_TRANSIENT:
                    self._log.debug("%s: accept: %s", self._name, e)
                    continue
                raise
            if self._exhausted:
                self._exhausted = False
                self._log.info("%s: accepting connections again", self._name)
            sock.setblocking(False)
            self._admit(sock, peer)

    def _pause(self, error: OSError | None = None) -> None:
        if not self._paused_until:
            try:
                self.sel.unregister(self._listener)
            except (KeyError, ValueError):
                pass
        self._paused_until = time.monotonic() + self._accept_pause
        if not self._exhausted:
            self._exhausted = True
            self._log.warning("%s: cannot accept connections (%s) with %d clients open: "
                              "retrying every %.1f s", self._name, error or "unexpected error",
                              len(self._clients), self._accept_pause)


class Connection:
    """One accepted client of a Listener: its registration with the selector and its close.

    A subclass sets ``server`` (its Listener) and ``sock`` and defines ``on_ready(mask)``,
    the selector callback, and ``name()``, how log lines call it."""

    events = 0        # what the selector waits for on ``sock``; 0: not registered
    closed = False

    def name(self) -> str:
        raise NotImplementedError

    def _want(self, events: int) -> bool:
        """Wait for ``events`` (0: for nothing until told); False, so callers can return it."""
        if events != self.events:
            sel = self.server.sel
            if not events:
                sel.unregister(self.sock)
            elif self.events:
                sel.modify(self.sock, events, self.on_ready)
            else:
                sel.register(self.sock, events, self.on_ready)
            self.events = events
        return False

    def close(self, why: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        log = self.server._log
        if why:
            log.debug("%s: closed (%s)", self.name(), why)
        if self.events:
            try:
                self.server.sel.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        try:
            self.sock.close()
        except OSError as e:
            log.debug("%s: close: %s", self.name(), e)
        self.server.forget(self)
