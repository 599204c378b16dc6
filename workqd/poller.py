"""The master's view of the broker: queue depth, consumers, dead letters, delayed tasks,
reachability.

The polling runs in a child process of its own, forked while the master is
still single-threaded: it blocks on the broker (connects, passive declares),
which the master's loop must never do. It keeps one connection open, polls
every INTERVAL seconds or at once when the master nudges it (a worker just
declared its queue), and writes one JSON line per round to a pipe that the
master's selector watches. It leaves when the master goes (EOF on the nudge
pipe) and is respawned by the master if it dies.

On the same connection it reads the cancel log (cancels.py) as it grows and
writes each cancel into the master's shared table, so its wait between rounds
lets the connection deliver at least every IO_EVERY seconds. The schedules
(schedules.py: leadership, the record, the firings) run beside it in a thread
with a connection of their own: a memory or disk alarm blocks a connection that
publishes, and must not stop the depth polling and the cancels with the firings.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import select
import signal
import time
import uuid
from dataclasses import replace

from . import cancels, forks, logsetup, schedules
from .slots import message_digest

log = logging.getLogger("workqd.master")

INTERVAL = 5.0                # seconds between rounds while the broker answers
INTERVAL_DISCONNECTED = 1.0   # while it does not
RESPAWN_DELAY = 1.0           # seconds before a dead poller is replaced
# Seconds without a report after which the poller is taken as stuck and replaced. Its
# connection's calls have no deadline of their own, and a broker can keep a connection
# alive with heartbeats yet never answer a declare or a consume; its rounds end every
# INTERVAL, or sooner, otherwise.
STUCK_AFTER = 60.0
MAX_LINE = 1 << 20            # a report longer than this is a bug: dropped
IO_EVERY = 0.25               # seconds the connection may wait unread: cancels arrive within
CANCEL_PREFETCH = 500         # cancel log entries in flight to the poller
LOAD_WAIT = 10.0              # seconds to read the log to its end before workers go ahead
MARK_BLOCKED_TIMEOUT = 2.0    # seconds a blocked mark publish may wait (an alarm)
FUTURE_SLACK_MS = 86_400_000  # a cancel stamped further ahead than this is someone's bug
DELAYED_EVERY = 10.0          # seconds between counts of the delay levels (23 questions)


class PollerProcess:
    """The master's handle on the poller child; master thread only."""

    def __init__(self, cfg, child_init, cancel_table=None):
        self.cfg = cfg
        self._child_init = child_init   # closes the master's resources in the child
        self.cancel_table = cancel_table   # the shared CancelTable the child fills
        self.cancels_held: int | None = None   # its last count; None until reported
        self.pid = 0
        self.connected = False
        self.depth: dict[str, tuple[int, int, int]] = {}   # queue -> (ready, consumers, dead)
        self.delayed: int | None = None   # messages in the vhost's delay levels; None: unknown
        self.schedules: tuple = ()   # state.ScheduleView each, as the child last reported
        self._fired_before: dict[str, int] = {}   # firings counted by earlier pollers
        self._report_r = self._nudge_w = -1
        self._buf = b""
        self._sel = None
        self._respawn_at = 0.0
        self._replacing = False   # reconfigure() ended it: respawn at once, not after a delay
        self._was_connected: bool | None = None
        self.rounds = 0      # reports received, so the master can tell a new one
        self._heard = (0, None)   # (rounds, when the master first saw that count)

    def start(self, sel) -> None:
        self._sel = sel
        self._spawn()

    def _spawn(self) -> None:
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        nudge_r, nudge_w = os.pipe2(os.O_CLOEXEC)
        pid = forks.fork()
        if pid == 0:
            code = 0
            try:
                logsetup.name_process("workqd-poller")   # first: tests and ps tell it apart
                os.close(report_r)
                os.close(nudge_w)
                self._child_init()
                _run(self.cfg, report_w, nudge_r, self.cancel_table)
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
        self._heard = (self.rounds, None)
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
        if self.cancel_table is not None:
            # The broker may have changed: workers started from now on wait for the
            # replacement's word on the delay levels, not the one before.
            self.cancel_table.set_levels(cancels.LEVELS_UNKNOWN)
        if self.pid:
            _kill(self.pid, signal.SIGTERM)  # reaped by the master, then respawned
            self._replacing = True
        self._respawn_at = 0.0

    def on_exit(self, now: float) -> None:
        """The master reaped the poller."""
        # Its firings stay counted: workqd_schedule_fired_total never goes backwards.
        self._fired_before = {v.name: v.fired for v in self.schedules}
        self.schedules = tuple(replace(v, leading=False) for v in self.schedules)
        self._close_pipes()
        self.pid = 0
        # A crash waits, so a poller that dies at once does not spin; a replacement
        # asked for by a reload does not, so the depth gauges never go missing.
        self._respawn_at = now if self._replacing else now + RESPAWN_DELAY
        self._replacing = False

    def manage(self, now: float) -> None:
        if not self.pid:
            if self._sel is not None and now >= self._respawn_at:
                self._spawn()
            return
        rounds, since = self._heard
        if since is None or rounds != self.rounds:
            self._heard = (self.rounds, now)
        elif now - since > STUCK_AFTER:
            log.warning("queue poller (pid %d) has not reported for %.0fs: a broker call that "
                        "never returns (the broker keeps its connection but does not answer); "
                        "replacing it", self.pid, now - since)
            # What it last said is no longer known to be true.
            self.connected, self.depth, self.delayed = False, {}, None
            self._heard = (self.rounds, float("inf"))   # killed once; reaping respawns it
            _kill(self.pid, signal.SIGKILL)

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
                self._note_cancels(report.get("cancels"))
                self.schedules = schedules.views(report.get("schedules"), self._fired_before)
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


    def _note_cancels(self, held) -> None:
        if isinstance(held, int) and not isinstance(held, bool) and held >= 0:
            self.cancels_held = held


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- the child --------------------------------------------------------------

def _run(cfg, report_fd: int, nudge_fd: int, table=None) -> None:
    import pika.exceptions  # the child is the only part of the master that talks AMQP

    from .broker import Failover, connection_parameters, redact
    from .vocab import dead_letter_queue

    logsetup.configure(cfg.log_level, f"queue poller (pid {os.getpid()})")
    failover = Failover(cfg.broker.urls)
    conn = None
    follower = _Cancels(table) if table is not None else None
    scheduler = schedules.Scheduler(cfg.schedules)
    scheduler.start(cfg.broker.urls, lambda url: connection_parameters(
        cfg.broker, url, "workqd master (schedules)"))
    load_deadline = time.monotonic() + LOAD_WAIT
    levels = _Levels(cfg, table)
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
            delayed = levels.keep(conn)   # first: workers wait for the levels, as for the log
            if follower is not None:
                follower.follow(conn, params)
            depth = _poll(conn, cfg, dead_letter_queue)
        except (pika.exceptions.AMQPError, OSError, ValueError) as e:
            error = f"{redact(failover.current)}: {e!r}"
            failover.failed()
            if conn is not None and conn.is_open:
                try:
                    conn.close()
                except (pika.exceptions.AMQPError, OSError):
                    pass
            conn = None
        if table is not None and not table.loaded and time.monotonic() >= load_deadline:
            log.warning("cancel log %s not read to its end within %gs; workers take tasks "
                        "meanwhile (cancels reach them as they are read)", cancels.STREAM,
                        LOAD_WAIT)
            table.set_loaded()
        stuck = scheduler.stuck_for(time.monotonic())
        if stuck >= schedules.STUCK_AFTER:
            # A thread cannot be stopped: the child goes, and with its connection the
            # schedules' lead, which this host or another then takes afresh.
            log.error("schedules: a broker call has not returned for %.0fs (the connection "
                      "is up, the call unanswered); the queue poller restarts", stuck)
            os._exit(70)
        report = {"connected": not error, "error": error, "depth": depth, "delayed": delayed}
        if table is not None:
            report["cancels"] = table.count()
        if cfg.schedules:
            report["schedules"] = scheduler.report()
        try:
            os.write(report_fd, json.dumps(report).encode() + b"\n")
        except BrokenPipeError:
            return   # the master closed its end: it is stopping
        deadline = time.monotonic() + (INTERVAL if not error else INTERVAL_DISCONNECTED)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if conn is not None and conn.is_open:
                # The cancel log's deliveries and the heartbeats: the connection is
                # served at least every IO_EVERY seconds, the nudge pipe between.
                try:
                    conn.process_data_events(time_limit=min(left, IO_EVERY))
                except (pika.exceptions.AMQPError, OSError):
                    conn = None
                    # Connect again soon, not at the next round: cancels keep coming.
                    deadline = min(deadline, time.monotonic() + INTERVAL_DISCONNECTED)
                    continue
                wait = 0.0
            else:
                wait = min(left, 1.0)
            ready, _, _ = select.select([nudge_fd], [], [], wait)
            if ready:
                if not os.read(nudge_fd, 4096):
                    return   # the master is gone
                break


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


def poll_delayed(conn, missing: list | None = None) -> int | None:
    """Messages waiting in the vhost's delay levels (delays.py): retries, deferrals and
    delayed submissions of every queue. None when the vhost has no levels yet. A passive
    declare of something missing closes the channel: one check of the delivery exchange
    first, so a vhost without levels costs one closed channel per round, not 23.
    ``missing`` gets the names of what was not there."""
    import pika.exceptions

    from . import delays
    ch = conn.channel()
    try:
        ch.exchange_declare(delays.DELIVER_EXCHANGE, passive=True)
    except pika.exceptions.ChannelClosedByBroker:
        if missing is not None:
            missing.append(delays.DELIVER_EXCHANGE)
        return None
    total = 0
    for n in range(delays.LEVELS):
        try:
            total += ch.queue_declare(delays.level_name(n), passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:
            ch = conn.channel()   # a level someone deleted: declared again (_Levels)
            if missing is not None:
                missing.append(delays.level_name(n))
    if ch.is_open:
        ch.close()
    return total


class _Levels:
    """The vhost's delay levels as this host's poller keeps them: declared once per
    connection for every worker of the host, which the shared table tells them (a
    worker then declares only its own queue's binding to them, not ninety shared
    objects per connection); declared again when a count finds a piece missing; and
    counted for the delayed gauge every DELAYED_EVERY seconds, not every round."""

    def __init__(self, cfg, table):
        # Only a daemon with a queue that declares side queues creates the levels.
        self.wanted = any(q.declare_side_queues for q in cfg.queues)
        self.table = table
        self.declared_on = None    # the connection they were last declared on
        self.counted_on = None     # ... and counted on, when, and the count
        self.counted_at = 0.0
        self.count: int | None = None
        self.refused = False       # the broker refused the last declaration

    def keep(self, conn) -> int | None:
        if self.wanted and self.declared_on is not conn:
            self._declare(conn)
        now = time.monotonic()
        if self.counted_on is not conn or now - self.counted_at >= DELAYED_EVERY:
            missing: list[str] = []
            self.count = poll_delayed(conn, missing)
            self.counted_on, self.counted_at = conn, now
            if missing and self.declared_on is conn and not self.refused:
                log.warning("delay levels missing on the broker (%s): declaring them again",
                            ", ".join(missing))
                self.declared_on = None
        return self.count

    def _declare(self, conn) -> None:
        import pika.exceptions

        from . import cancels, delays
        self.declared_on = conn   # a refusal is not asked again on this connection
        try:
            ch = conn.channel()
            delays.declare(ch)
            ch.close()
        except pika.exceptions.ChannelClosedByBroker as e:
            # Workers then declare the levels themselves, and say what is wrong.
            log.warning("cannot declare the delay levels: %s %s", e.reply_code, e.reply_text)
            word = cancels.LEVELS_REFUSED
        else:
            word = cancels.LEVELS_DECLARED
        self.refused = word == cancels.LEVELS_REFUSED
        if self.table is not None:
            self.table.set_levels(word)


# --- the cancel log ------------------------------------------------------------

class _Cancels:
    """Follows the cancel log into the table, across connections; the child's only."""

    def __init__(self, table):
        self.table = table
        self.reader: _CancelReader | None = None
        self._refusal = ""      # the last refusal logged, so a lasting one is logged once

    def follow(self, conn, params) -> None:
        """Keep one reader on ``conn`` (opened with ``params``). A refusal of the log is
        logged, the depth polling goes on, and the next round tries again."""
        import pika.exceptions
        if self.reader is not None and self.reader.conn is conn and self.reader.consuming:
            return
        try:
            self.reader = _CancelReader(conn, self.table, params)
        except pika.exceptions.ChannelClosedByBroker as e:
            self.reader = None
            if e.reply_text != self._refusal:
                self._refusal = e.reply_text
                log.warning("cannot read the cancel log %s: %s; cancels do not reach this "
                            "host's workers until it can (trying again every %gs)",
                            cancels.STREAM, e.reply_text, INTERVAL)
            if not self.table.loaded:
                self.table.set_loaded()   # nothing to wait for: workers take tasks meanwhile
            return
        if self._refusal:
            log.info("cancel log %s readable again", cancels.STREAM)
            self._refusal = ""


class _CancelReader:
    """One consumer of the cancel log on its own channel; built per connection, so a
    reconnect reads the log again from its start (the table keeps what it has)."""

    def __init__(self, conn, table, params=None):
        import pika.exceptions
        self.conn = conn
        self.table = table
        self.channel = conn.channel()
        try:
            ok = self.channel.queue_declare(cancels.STREAM, durable=True,
                                            arguments=cancels.stream_arguments())
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != 406:
                raise
            # Declared elsewhere with another retention: readable all the same.
            self.channel = conn.channel()
            ok = self.channel.queue_declare(cancels.STREAM, passive=True)
        # The log's end: this reader's mark, appended now. When the mark cannot be
        # written (no write permission on the default exchange), the log's length as the
        # broker counts it, which lags by seconds behind the newest entries.
        self.mark = self._append_mark(params) if params is not None else None
        self.to_load = ok.method.message_count
        self.read = self.added = self.ignored = 0
        self.channel.basic_qos(prefetch_count=CANCEL_PREFETCH)
        self.tag = self.channel.basic_consume(
            cancels.STREAM, self._on_entry, arguments={"x-stream-offset": "first"})
        self._check_loaded()

    def _append_mark(self, params) -> str | None:
        """Appends this reader's mark, confirmed, on a short connection of its own; None
        when the broker refuses it or blocks publishers. Never on the poller's connection:
        in a memory or disk alarm RabbitMQ stops reading a connection that publishes, and
        the depth polling and the cancels on it would stop with it."""
        import pika
        import pika.exceptions
        mark = f"workqd-log-mark-{os.getpid()}-{uuid.uuid4().hex}"
        params = copy.copy(params)
        # A blocked publisher is cut after this long instead of waiting out the alarm.
        params.blocked_connection_timeout = MARK_BLOCKED_TIMEOUT
        pub = None
        try:
            pub = pika.BlockingConnection(params)
            ch = pub.channel()
            ch.confirm_delivery()
            ch.basic_publish("", cancels.STREAM, b"",
                             pika.BasicProperties(message_id=mark, headers={cancels.H_MARK: 1}))
        except (pika.exceptions.AMQPError, OSError) as e:
            log.info("cannot mark the end of the cancel log %s (%r): its length as the broker "
                     "counts it stands in", cancels.STREAM, e)
            return None
        finally:
            if pub is not None and pub.is_open:
                try:
                    pub.close()
                except (pika.exceptions.AMQPError, OSError):
                    pass
        return mark

    @property
    def consuming(self) -> bool:
        return self.channel.is_open and self.tag in self.channel.consumer_tags

    def _on_entry(self, channel, method, props, body) -> None:
        channel.basic_ack(method.delivery_tag)
        self.read += 1
        if isinstance(props.headers, dict) and cancels.H_MARK in props.headers:
            if self.mark is not None and props.message_id == self.mark:
                # Read back: every cancel confirmed before it is in the table.
                self.mark, self.to_load = None, 0
            # A reader's mark, this one's or another host's, is not a cancel; it counts
            # toward the log's length all the same, and may be the last entry of it.
            self._check_loaded()
            return
        entry = cancel_entry(props, int(time.time() * 1000))
        if isinstance(entry, str):
            self.ignored += 1
            log.debug("cancel log entry ignored: %s", entry)
        elif entry is not None and self.table.add(message_digest(entry[0]), entry[1]):
            self.added += 1
            # Each live cancel is worth a line; the replay at start is summed up in one.
            log.log(logging.INFO if self.table.loaded else logging.DEBUG,
                    "cancel of message %s read (cancelled at %s)", entry[0],
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry[1] / 1000)))
        self._check_loaded()

    def _check_loaded(self) -> None:
        if self.mark is not None:
            return
        if self.read >= self.to_load and not self.table.loaded:
            log.info("cancel log %s read: %d entries, %d cancels taken, %d ignored",
                     cancels.STREAM, self.read, self.added, self.ignored)
            self.table.set_loaded()


def cancel_entry(props, now_ms: int, retention_ms: int = int(cancels.RETENTION * 1000)):
    """(message id, cancelled at ms) of a log entry; None when it is past the retention;
    a one-line reason when it is not a cancel workqd can use (someone else's bytes)."""
    mid = props.message_id
    if not isinstance(mid, str) or not mid:
        return f"no message id (message_id {mid!r:.80})"
    headers = props.headers if isinstance(props.headers, dict) else {}
    at = headers.get(cancels.H_CANCELLED_MS)
    # pika decodes a 64-bit header as its own subclass of int.
    if not isinstance(at, int) or isinstance(at, bool) or not 0 < at <= now_ms + FUTURE_SLACK_MS:
        return f"message {mid!r:.80}: bad {cancels.H_CANCELLED_MS} {at!r:.40}"
    if at < now_ms - retention_ms:
        return None
    return mid, int(at)
