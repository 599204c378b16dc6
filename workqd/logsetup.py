"""Logging to stderr, one line per event: text in the shape systemd's journal wants, or
JSON for log shippers; under journald, text goes over the native journal protocol with
the queue and message id as journal fields (``journalctl -u workqd QUEUE=thumbs``)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import struct
import sys

# syslog priorities, so journald files each line under the right level.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "workqd"

# The format the master chose; a worker or poller forked from it keeps it, so only
# the master's configure() needs to be told (cli.py at start, master.py on reload).
_format = "text"

# Workers name themselves "worker <queue>#<n> (pid <pid>)" (worker/process.py).
_WORKER = re.compile(r"worker (.+)#[0-9]+ \(pid [0-9]+\)\Z")


def _message_id(record: logging.LogRecord) -> str | None:
    """The task a record is about: ``extra={"message_id": ...}``, or the first argument of
    the worker's "task %s ..." lines (every line about a task is written that way)."""
    mid = getattr(record, "message_id", None)
    if mid is None and isinstance(record.msg, str) and record.msg.startswith("task %s") \
            and isinstance(record.args, tuple) and record.args:
        mid = record.args[0]
    return None if mid is None else str(mid)


class _Formatter(logging.Formatter):
    def __init__(self, who: str, journal: bool):
        # The journal stamps each line itself; a terminal or file needs our own time.
        fmt = "%(message)s" if journal else "%(asctime)s %(levelname)s %(message)s"
        super().__init__(fmt)
        self.who = who
        self.journal = journal

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        # Message ids, queue names and handler output come from outside: a newline
        # or an escape sequence in them must not forge or garble log lines.
        record.message = _escape(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.who}: {super().format(record)}"
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, process, pid, queue, message_id, event."""

    def __init__(self, who: str):
        super().__init__()
        self.who = who
        m = _WORKER.match(who)
        self.queue = m.group(1) if m else None

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
               .isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "process": self.who, "pid": record.process,
               "queue": getattr(record, "queue", None) or self.queue,
               "message_id": _message_id(record), "event": record.getMessage()}
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        # ensure_ascii: control characters and odd bytes from outside stay escaped.
        return json.dumps(doc, ensure_ascii=True)


class _JournalHandler(logging.Handler):
    """The native journal protocol (systemd.journal-fields(7)): one datagram per record on
    journald's socket, no dependency. What cannot be sent goes to stderr as text."""

    def __init__(self, who: str):
        super().__init__()
        self.who = who
        m = _WORKER.match(who)
        self.queue = m.group(1) if m else None
        self.text = _Formatter(who, journal=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = f"{self.who}: {_escape(record.getMessage())}"
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            fields = {"MESSAGE": message, "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
                      "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER, "WORKQ_PROCESS": self.who}
            queue = getattr(record, "queue", None) or self.queue
            if queue:
                fields["QUEUE"] = queue
            mid = _message_id(record)
            if mid:
                # MESSAGE_ID is the journal's own (catalog ids); ours has a prefix.
                fields["WORKQ_MESSAGE_ID"] = mid
            self.sock.sendto(journal_datagram(fields), JOURNAL_SOCKET)
        except OSError:
            # journald gone, or a record too large for one datagram: keep it anyway.
            try:
                sys.stderr.write(self.text.format(record) + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        except Exception:  # logging must never take the process down
            self.handleError(record)


def journal_datagram(fields: dict[str, str]) -> bytes:
    """Fields in the journal's native format: ``KEY=value\\n``, or for a value with a
    newline ``KEY\\n`` + its length (64-bit little endian) + value + ``\\n``."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def _journal_stderr() -> bool:
    """stderr is the journal stream systemd connected (JOURNAL_STREAM is its dev:inode),
    not something the operator redirected it to."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


# C0, DEL and C1 (U+0080..U+009F: CSI, U+009B, starts an escape sequence too).
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def _escape(text: str) -> str:
    return text.translate(_CONTROL) if not text.isprintable() else text


def configure(level: str, who: str, fmt: str | None = None) -> None:
    """(Re)configure the root logger; ``who`` names the process (master, worker tasks#1 ...);
    ``fmt`` (text or json) is given by the master, and its children keep it."""
    global _format
    if fmt is not None:
        _format = fmt
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    root = logging.getLogger()
    if _format == "json":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter(who))
    elif journal and _journal_stderr() and os.path.exists(JOURNAL_SOCKET):
        handler = _JournalHandler(who)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter(who, journal))
    for old in root.handlers[:]:
        root.removeHandler(old)
        if isinstance(old, _JournalHandler):
            old.sock.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("pika").setLevel(logging.CRITICAL if level != "debug" else logging.INFO)


def name_process(name: str) -> None:
    """What ps and top show for this process (15 bytes at most); cosmetic, so never fatal."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass
