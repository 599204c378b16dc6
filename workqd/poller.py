"""The master's view of the broker: queue depth, consumers, dead letters, delayed tasks,
reachability.

The polling runs in a child process of its own, forked while the master is
still single-threaded: it blocks on the broker (connects, passive declares),
which the master's loop must never do. It keeps one connection open, polls
every INTERVAL seconds or at once when the master nudges it (a worker just
declared its queue), and writes one JSON line per round to a pipe that the
master's selector watches. It leaves when the master goes (EOF on the nudge
pipe) and is respawned by the master if it dies.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import time

from . import logsetup

log = logging.getLogger("workqd.master")

INTERVAL = 5.0                # seconds between rounds while the broker answers
INTERVAL_DISCONNECTED = 1.0   # while it does not
RESPAWN_DELAY = 1.0           # seconds before a dead poller is replaced
MAX_LINE = 1 << 20            # a report longer than this is a bug: dropped


class PollerProcess:
    """The master's handle on the poller child; master thread only."""

    def __init__(self, cfg, child_init):
        self.cfg = cfg
        self._child_init = child_init   # closes the master's resources in the child
        self.pid = 0
        self.connected = False
        self.depth: dict[str, tuple[int, int, int]] = {}   # queue -> (ready, consumers, dead)
        self.delayed: int | None = None   # messages in the vhost's delay levels; None: unknown
        self._report_r = self._nudge_w = -1
        self._buf = b""
        self._sel = None
        self._respawn_at = 0.0
        self._replacing = False   # reconfigure() ended it: respawn at once, not after a delay
        self._was_connected: bool | None = None
        self.rounds = 0      # reports received, so the master can tell a new one

    def start(self, sel) -> None:
        self._sel = sel
        self._spawn()

    def _spawn(self) -> None:
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        nudge_r, nudge_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                logsetup.name_process("workqd-poller")   # first: tests and ps tell it apart
                os.close(report_r)
                os.close(nudge_w)
                self._child_init()
                _run(self.cfg, report_w, nudge_r)
            except BaseException:
                logging.getLogger("workqd.master").exception("queue poller crashed")
                code = 70
            finally:
                os._exit(code)
        os.close(report_w)
        os.close(nudge_r)
        os.set_blocking(report_r, False)
        os.set_blocking(nudge_w, False)
        self.pid, self._report_r, self._nudge_w, self._buf = pid, report_r, nudge_w, b""
        self._sel.register(report_r, 1, self._on_readable)  # selectors.EVENT_READ

    def fds(self) -> tuple[int, ...]:
        """Descriptors a forked worker must close."""
        return tuple(fd for fd in (self._report_r, self._nudge_w) if fd >= 0)

    def nudge(self) -> None:
        """Poll now (a worker started consuming: its queue exists)."""
        if self._nudge_w >= 0:
            try:
                os.write(self._nudge_w, b"n")
            except (BlockingIOError, BrokenPipeError):
                pass

    def reconfigure(self, cfg) -> None:
        """New queues or broker: replace the poller."""
        self.cfg = cfg
        if self.pid:
            _kill(self.pid, signal.SIGTERM)  # reaped by the master, then respawned
            self._replacing = True
        self._respawn_at = 0.0

    def on_exit(self, now: float) -> None:
        """The master reaped the poller."""
        self._close_pipes()
        self.pid = 0
        # A crash waits, so a poller that dies at once does not spin; a replacement
        # asked for by a reload does not, so the depth gauges never go missing.
        self._respawn_at = now if self._replacing else now + RESPAWN_DELAY
        self._replacing = False

    def manage(self, now: float) -> None:
        if not self.pid and self._sel is not None and now >= self._respawn_at:
            self._spawn()

    def stop(self) -> None:
        if self.pid:
            _kill(self.pid, signal.SIGTERM)
        self._close_pipes()
        self._sel = None

    def _close_pipes(self) -> None:
        if self._report_r >= 0:
            if self._sel is not None:
                self._sel.unregister(self._report_r)
            os.close(self._report_r)
        if self._nudge_w >= 0:
            os.close(self._nudge_w)
        self._report_r = self._nudge_w = -1

    def _on_readable(self, mask) -> None:
        try:
            data = os.read(self._report_r, 65536)
        except BlockingIOError:
            return
        if not data:  # the child is gone; reaping respawns it
            self._sel.unregister(self._report_r)
            os.close(self._report_r)
            self._report_r = -1
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > MAX_LINE:
            self._buf = b""
        for line in lines[-1:]:   # only the latest round matters
            try:
                report = json.loads(line)
                delayed = report.get("delayed")
                self._apply(bool(report["connected"]), report.get("error", ""),
                            {q: tuple(v) for q, v in report["depth"].items()},
                            delayed if type(delayed) is int else None)
            except (ValueError, KeyError, TypeError, AttributeError):
                log.debug("bad report from the queue poller: %r", line[:200])

    def _apply(self, connected: bool, error: str, depth, delayed: int | None = None) -> None:
        self.rounds += 1
        self.connected = connected
        self.depth = depth if connected else {}   # no stale depth while unreachable
        self.delayed = delayed if connected else None
        if connected != self._was_connected:
            if connected:
                log.info("broker reachable")
            else:
                log.warning("broker not reachable: %s", error)
            self._was_connected = connected


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- the child --------------------------------------------------------------

def _run(cfg, report_fd: int, nudge_fd: int) -> None:
    import pika.exceptions  # the child is the only part of the master that talks AMQP

    from .broker import Failover, connection_parameters, redact
    from .vocab import dead_letter_queue

    logsetup.configure(cfg.log_level, f"queue poller (pid {os.getpid()})")
    failover = Failover(cfg.broker.urls)
    conn = None
    while True:
        error = ""
        depth = {}
        delayed = None
        try:
            if conn is None or not conn.is_open:
                params = connection_parameters(cfg.broker, failover.current,
                                               "workqd master (queue poller)")
                conn = pika.BlockingConnection(params)
                failover.succeeded()
            depth = _poll(conn, cfg, dead_letter_queue)
            delayed = poll_delayed(conn)
        except (pika.exceptions.AMQPError, OSError, ValueError) as e:
            error = f"{redact(failover.current)}: {e!r}"
            failover.failed()
            if conn is not None and conn.is_open:
                try:
                    conn.close()
                except (pika.exceptions.AMQPError, OSError):
                    pass
            conn = None
        line = json.dumps({"connected": not error, "error": error, "depth": depth,
                           "delayed": delayed})
        try:
            os.write(report_fd, line.encode() + b"\n")
        except BrokenPipeError:
            return   # the master closed its end: it is stopping
        deadline = time.monotonic() + (INTERVAL if not error else INTERVAL_DISCONNECTED)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([nudge_fd], [], [], min(left, 1.0))
            if ready:
                if not os.read(nudge_fd, 4096):
                    return   # the master is gone
                break
            if conn is not None and conn.is_open:
                try:
                    conn.process_data_events(0)   # heartbeats
                except (pika.exceptions.AMQPError, OSError):
                    conn = None


def _poll(conn, cfg, dead_letter_queue) -> dict:
    import pika.exceptions
    depth = {}
    ch = conn.channel()
    for q in cfg.queues:
        sample = []
        for name in (q.name, dead_letter_queue(q.name)):
            try:
                ok = ch.queue_declare(name, passive=True)
                sample.append((ok.method.message_count, ok.method.consumer_count))
            except pika.exceptions.ChannelClosedByBroker:
                sample.append(None)   # not declared yet: no sample rather than a made-up 0
                ch = conn.channel()
        if sample[0] is not None:
            depth[q.name] = (*sample[0], sample[1][0] if sample[1] else 0)
    if ch.is_open:
        ch.close()
    return depth


def poll_delayed(conn) -> int | None:
    """Messages waiting in the vhost's delay levels (delays.py): retries, deferrals and
    delayed submissions of every queue. None when the vhost has no levels yet. A passive
    declare of something missing closes the channel: one check of the delivery exchange
    first, so a vhost without levels costs one closed channel per round, not 23."""
    import pika.exceptions

    from . import delays
    ch = conn.channel()
    try:
        ch.exchange_declare(delays.DELIVER_EXCHANGE, passive=True)
    except pika.exceptions.ChannelClosedByBroker:
        return None
    total = 0
    for n in range(delays.LEVELS):
        try:
            total += ch.queue_declare(delays.level_name(n), passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:
            ch = conn.channel()   # a level someone deleted: the workers declare it again
    if ch.is_open:
        ch.close()
    return total
