"""2,000 hostile idle connections against the HTTP server in its own process, 1024 fds.

The server is test_httpd.py run as a script: httpd.HttpServer with the default
limits, driven by a select loop like the master's, under RLIMIT_NOFILE 1024.
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from pathlib import Path

from unit.test_httpd import METRICS, fd_count, get, start_server, wait_for

from workqd import httpd

IDLE = 2_000
SCRAPES = 20
SEQUENTIAL = 2_000
# O_NONBLOCK and O_CLOEXEC in /proc/PID/fdinfo's octal "flags".
O_NONBLOCK, O_CLOEXEC = 0o4000, 0o2000000


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def socket_flags(pid: int) -> list[int]:
    flags = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue  # closed meanwhile
        flags.append(int(info.split("flags:")[1].split()[0], 8))
    return flags


def all_nonblocking_cloexec(flags: list[int]) -> bool:
    return bool(flags) and all(f & O_NONBLOCK and f & O_CLOEXEC for f in flags)


def idle_connection(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET /metr")  # and never the rest
    return s


class Churn:
    """Keeps opening idle connections, holding up to IDLE of them, until stopped."""

    def __init__(self, port: int, held: list[socket.socket]):
        self.port, self.held = port, held
        self.opened = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.held.append(idle_connection(self.port))
            except OSError:
                continue
            self.opened += 1
            if len(self.held) > IDLE:
                self.held.pop(0).close()


def test_idle_flood_under_1024_fds_leaves_scrapes_answered_and_fds_bounded(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE + 1000), hard))
    proc, port, log_path = start_server(tmp_path, nofile=1024)
    held: list[socket.socket] = []
    churn = None
    try:
        baseline = fd_count(proc.pid)
        for _ in range(IDLE):
            held.append(idle_connection(port))
        churn = Churn(port, held)  # the attacker goes on while Prometheus scrapes
        latencies, fds, thread_counts = [], [], []
        for _ in range(SCRAPES):
            started = time.monotonic()
            status, _, body = get(port)
            latencies.append(time.monotonic() - started)
            assert (status, body) == (200, METRICS)
            fds.append(fd_count(proc.pid))
            thread_counts.append(threads(proc.pid))
        churn.stop.set()
        churn.thread.join(30)
        # Python's accept() makes a socket non-blocking just after accept4() returns it,
        # so flags read during the churn can catch that moment: read them once the
        # attacker stopped, until every socket the server holds has both flags.
        wait_for(lambda: all_nonblocking_cloexec(socket_flags(proc.pid)), 10,
                 "every server socket non-blocking and close-on-exec")
        print(f"\nidle flood: {IDLE} + {churn.opened} idle connections opened; {SCRAPES} scrapes, "
              f"latency max {max(latencies) * 1000:.0f} ms, median "
              f"{sorted(latencies)[SCRAPES // 2] * 1000:.0f} ms; server fds max {max(fds)} "
              f"(baseline {baseline}), threads max {max(thread_counts)}")
        assert max(latencies) < 5.0  # generous: a second is typical on a loaded 2-core box
        assert max(fds) <= baseline + httpd.MAX_CLIENTS + 1
        assert thread_counts == [1] * SCRAPES

        for s in held:
            s.close()
        held.clear()
        wait_for(lambda: fd_count(proc.pid) == baseline, 30, "the server to close every client")
        started = time.monotonic()
        for _ in range(SEQUENTIAL):
            assert get(port)[0] == 200
        elapsed = time.monotonic() - started
        wait_for(lambda: fd_count(proc.pid) == baseline, 30, "the fd count back to its baseline")
        print(f"{SEQUENTIAL} sequential scrapes in {elapsed:.1f} s; fds {baseline} before and "
              f"{fd_count(proc.pid)} after; threads {threads(proc.pid)}")
        assert threads(proc.pid) == 1
        proc.terminate()
        assert proc.wait(10) == 0
        text = log_path.read_text()
        assert "Traceback" not in text and "cannot accept" not in text, text[-2000:]
        print(text.strip().splitlines()[-1])
    finally:
        if churn is not None:
            churn.stop.set()
            churn.thread.join(30)
        for s in held:
            s.close()
        proc.terminate()
        proc.wait(10)
