"""Logging to stderr, one line per event, in the shape systemd's journal wants."""

from __future__ import annotations

import logging
import os
import sys

# syslog priorities, so journald files each line under the right level.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _Formatter(logging.Formatter):
    def __init__(self, who: str, journal: bool):
        # The journal stamps each line itself; a terminal or file needs our own time.
        fmt = "%(message)s" if journal else "%(asctime)s %(levelname)s %(message)s"
        super().__init__(fmt)
        self.who = who
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.who}: {super().format(record)}"
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def configure(level: str, who: str) -> None:
    """(Re)configure the root logger; ``who`` names the process (master, worker tasks#1 ...)."""
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    root = logging.getLogger()
    handler = root.handlers[0] if root.handlers else logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(who, journal))
    if not root.handlers:
        root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("pika").setLevel(logging.CRITICAL if level != "debug" else logging.INFO)
