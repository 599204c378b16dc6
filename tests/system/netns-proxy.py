#!/usr/bin/env python3
"""An HTTP proxy on 127.0.0.1:PORT inside a container's network namespace that
reaches the named hosts from the host's: apt and pip in a container booted with
--private-network install from the real archive and PyPI, while the
container's broker stays unreachable from the host and the host's from it.

    netns-proxy.py PID PORT HOST...

PID is any process in the container; HOST the only hosts it forwards to (plain
HTTP on port 80, CONNECT on port 443). Prints "listening" once it serves, and
exits by itself when PID is gone.
"""
import ctypes
import os
import socket
import sys
import threading
import urllib.parse

CLONE_NEWNET = 0x40000000
IDLE_TIMEOUT = 120       # seconds a connection may stay silent both ways
HEAD_LIMIT = 64 * 1024   # bytes of request head read before giving up

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def listen_in(pid: int, port: int) -> socket.socket:
    # A socket stays in the namespace it was made in: make the listener in the
    # container's and return to the host's for every outbound connection.
    host = os.open("/proc/self/ns/net", os.O_RDONLY)
    container = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        setns(container)
        try:
            return socket.create_server(("127.0.0.1", port))
        finally:
            setns(host)
    finally:
        os.close(host)
        os.close(container)


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def refuse(client: socket.socket, why: str) -> None:
    print(f"netns-proxy: refused {why}", file=sys.stderr, flush=True)
    client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def serve(client: socket.socket, allowed: set[str]) -> None:
    client.settimeout(IDLE_TIMEOUT)
    with client:
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(65536)
            if not data or len(head) > HEAD_LIMIT:
                return
            head += data
        method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            if host not in allowed or port != "443":
                return refuse(client, target)
            upstream = socket.create_connection((host, 443), timeout=30)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            rest = head.split(b"\r\n\r\n", 1)[1]
        else:
            url = urllib.parse.urlsplit(target)
            if url.scheme != "http" or url.hostname not in allowed or (url.port or 80) != 80:
                return refuse(client, target)
            upstream = socket.create_connection((url.hostname, 80), timeout=30)
            rest = head  # HTTP/1.1 servers take the absolute form as it is
        with upstream:
            upstream.settimeout(IDLE_TIMEOUT)
            if rest:
                upstream.sendall(rest)
            back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
            back.start()
            pump(client, upstream)
            back.join(IDLE_TIMEOUT)


def main() -> int:
    if len(sys.argv) < 4:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    pid, port, allowed = int(sys.argv[1]), int(sys.argv[2]), set(sys.argv[3:])
    listener = listen_in(pid, port)
    listener.settimeout(1)
    print("listening", flush=True)
    while os.path.exists(f"/proc/{pid}"):
        try:
            client, _ = listener.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve, args=(client, allowed), daemon=True).start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
