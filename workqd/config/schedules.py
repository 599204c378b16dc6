"""The reader of ``schedules``: periodic tasks (workqd/schedules.py runs them).

Every simple key comes from the schema; here is what needs code: the name, exactly
one of cron and every (each parsed now, so a bad expression is refused at load,
not at the first firing), the time zone, and the headers.
"""

from __future__ import annotations

import re
from typing import Any

from .. import cron, when
from .convert import is_number, queue_name
from .errors import Invalid, show
from .model import Schedule
from .reader import Reader

_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}", re.ASCII)
MAX_EVERY = 366 * 86400.0   # longer periods are a cron expression's job
MAX_BODY_CHARS = 65536
MAX_HEADERS = 64


def schedules(r: Reader, raw: Any) -> tuple[Schedule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.problem("schedules", f"must be a list of schedules, got {show(raw)}")
        return ()
    out: list[Schedule] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        s = schedule(r, item, f"schedules[{i}]")
        if s is None:
            continue
        if s.name in seen:
            r.problem(f"schedules[{i}].name", f"{s.name!r} is given twice")
        seen.add(s.name)
        out.append(s)
    return tuple(out)


def schedule(r: Reader, raw: Any, key: str) -> Schedule | None:
    if not isinstance(raw, dict):
        r.problem(key, f"must be a mapping with name, queue and cron or every, got {show(raw)}")
        return None
    data = r.section(raw, key, "schedules[]")
    before = len(r.problems)
    kwargs = r.settings(data, key, "schedules[]")
    kwargs.update(r.fields(data, key, {"name": name, "queue": queue_name, "cron": expression,
                                       "every": every, "timezone": timezone, "body": body,
                                       "headers": headers}))
    for k in ("name", "queue"):
        if data.get(k) is None:
            r.problem(f"{key}.{k}", "is required")
    if (data.get("cron") is None) == (data.get("every") is None):
        r.problem(key, "give exactly one of cron and every")
    if "every" in kwargs and data.get("timezone") is not None:
        r.warning(f"{key}.timezone", "is not used with every (its slots count from the "
                  "epoch, in UTC)")
    if len(r.problems) > before:
        return None
    return Schedule(**kwargs)


def name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise Invalid(f"must be 1 to 100 of A-Z a-z 0-9 . _ -, got {show(value)}")
    return value


def expression(value: Any) -> str:
    try:
        return cron.parse(value).text
    except ValueError as e:
        raise Invalid(str(e)) from None


def every(value: Any) -> float:
    try:
        seconds = float(value) if is_number(value) else when.duration(value)
    except (ValueError, TypeError) as e:
        raise Invalid(str(e) if isinstance(value, str) else
                      f"must be a duration like 90s, 15m or 1d, got {show(value)}") from None
    if seconds != int(seconds) or not 1 <= seconds <= MAX_EVERY:
        raise Invalid(f"must be whole seconds from 1s to 366d, got {show(value)}")
    return float(seconds)


def timezone(value: Any) -> str:
    try:
        cron.zone(value)
    except ValueError as e:
        raise Invalid(str(e)) from None
    return value


def body(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_BODY_CHARS:
        raise Invalid(f"must be a string of at most {MAX_BODY_CHARS} characters, "
                      f"got {show(value)}")
    return value


def headers(value: Any) -> tuple[tuple[str, Any], ...]:
    if not isinstance(value, dict) or len(value) > MAX_HEADERS:
        raise Invalid(f"must be a mapping of at most {MAX_HEADERS} names to strings or "
                      f"numbers, got {show(value)}")
    out = []
    for k, v in value.items():
        if not isinstance(k, str) or not k or len(k) > 128 or k.startswith("x-workq-"):
            raise Invalid(f"{show(k)}: a header name is 1 to 128 characters, not x-workq-*")
        if not (isinstance(v, str) or is_number(v)) or (isinstance(v, str) and len(v) > 4096):
            raise Invalid(f"{k}: must be a string (at most 4096 characters) or a number, "
                          f"got {show(v)}")
        out.append((k, v))
    return tuple(out)
