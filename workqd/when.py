"""Durations and points in time as operators write them: ``90``, ``90s``, ``15m``,
``2h``, ``3d``; ``2026-12-24T03:00:00+01:00``. One reader for every command line and
config key that takes one, so they all accept the same words."""

from __future__ import annotations

import datetime
import math
import re

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)", re.ASCII)


def duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``2h`` or ``3d``; ValueError otherwise."""
    m = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"must be a duration like 90, 90s, 15m, 2h or 3d, got {text!r}")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a duration above 0, got {text!r}")
    return seconds


def moment(text: str) -> datetime.datetime:
    """An aware datetime from ISO 8601 with its UTC offset (or Z); ValueError otherwise."""
    try:
        value = datetime.datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"must be a time in ISO 8601 with its offset, like "
                         f"2026-12-24T03:00:00+01:00, got {text!r}") from None
    if value.tzinfo is None:
        raise ValueError(f"must carry its UTC offset (+01:00, Z), got {text!r}")
    return value


def duration_or_moment(text: str) -> float | datetime.datetime:
    """A duration when it reads as one, else a point in time."""
    try:
        return duration(text)
    except ValueError:
        pass
    try:
        return moment(text)
    except ValueError:
        raise ValueError(f"must be a duration like 10m or a time like "
                         f"2026-12-24T03:00:00+01:00, got {text!r}") from None
