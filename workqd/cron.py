"""Five-field cron expressions and their firing instants in a named time zone.

Pure: ``parse`` reads an expression (raising ValueError with one line), and
``Cron.next_after`` gives the first firing instant (aware, UTC) strictly after
an instant. Daylight saving follows cronie (and Vixie cron before it):

- A *fixed-time* expression (neither the minute nor the hour field starts with
  ``*``, such as ``30 2 * * *``) fires once per matching local time. A local
  time that does not exist (the spring-forward gap) fires at the first instant
  after the gap; a local time that occurs twice (the fall-back hour) fires once,
  at its first occurrence.
- A *wildcard* expression (the minute or the hour field starts with ``*``, such
  as ``*/15 * * * *`` or ``0 * * * *``) follows the clock on the wall: it fires
  at each instant whose local time matches, so it does not fire in the gap (that
  time never happens) and fires in both passes of the repeated hour.

Several local times that map to one instant (the gap's times and the instant
after it) fire once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

UTC = dt.timezone.utc
SEARCH_DAYS = 366 * 8 + 2   # an expression that matches no day in this span never fires
# Hours a clock has ever been set back at once in the zoneinfo data (Lord Howe 30 min,
# most zones 1 h, a few 2 h), with margin: wall times earlier than this before a
# moment's own cannot be read after it.
SHIFT_HOURS = 3

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (name, low, high, names): dow 7 is Sunday too, as in cronie.
_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
           ("month", 1, 12, _MONTHS), ("day of week", 0, 7, _DAYS))
_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
           "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
           "@hourly": "0 * * * *"}


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]        # of the month, 1-31
    months: frozenset[int]      # 1-12
    weekdays: frozenset[int]    # 0-6, Sunday 0
    dom_star: bool              # the day-of-month field starts with *
    dow_star: bool
    wildcard: bool              # the minute or hour field starts with *: see the module doc

    @property
    def _hours(self) -> list[int]:
        return sorted(self.hours)

    @property
    def _minutes(self) -> list[int]:
        return sorted(self.minutes)

    def day_matches(self, d: dt.date) -> bool:
        if d.month not in self.months:
            return False
        dom = d.day in self.days
        dow = (d.isoweekday() % 7) in self.weekdays
        # Both day fields restricted: either may match (as in every cron since Vixie).
        if self.dom_star or self.dow_star:
            return dom and dow
        return dom or dow

    def next_after(self, after: dt.datetime, tz: dt.tzinfo) -> dt.datetime | None:
        """The first firing instant strictly after ``after`` (aware), in UTC; None when the
        expression matches nothing within SEARCH_DAYS (such as 30 February)."""
        after = after.astimezone(UTC)
        local = after.astimezone(tz).replace(tzinfo=None)
        day = local.date() - dt.timedelta(days=1)
        skip_before = local - dt.timedelta(hours=SHIFT_HOURS)
        for _ in range(SEARCH_DAYS):
            if self.day_matches(day):
                found = self._first_in_day(day, tz, after, skip_before)
                if found is not None:
                    return found
            day += dt.timedelta(days=1)
        return None

    def _first_in_day(self, day: dt.date, tz: dt.tzinfo, after: dt.datetime,
                      skip_before: dt.datetime) -> dt.datetime | None:
        """The earliest instant of ``day`` after ``after``. Walks the day's wall times in
        order; the first reading (fold 0) never goes backwards as the wall time grows, so
        the walk ends at the first wall time read after ``after``, keeping any second
        reading (fold 1) of a repeated wall time met on the way."""
        best = None
        for h in self._hours:
            if dt.datetime(day.year, day.month, day.day, h, 59) < skip_before:
                continue
            for m in self._minutes:
                wall = dt.datetime(day.year, day.month, day.day, h, m)
                if wall < skip_before:
                    continue
                first = wall.replace(tzinfo=tz)
                if _exists(first):
                    t = first.astimezone(UTC)
                    if self.wildcard:
                        second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
                        if second != t and second > after and (best is None or second < best):
                            best = second
                elif self.wildcard:
                    continue   # a wall time that never happens: a wildcard skips it
                else:
                    t = gap_end(first)
                if t > after:
                    return t if best is None or t < best else best
        return best


def _exists(t: dt.datetime) -> bool:
    """The local time ``t`` happens (is not inside a spring-forward gap)."""
    back = t.astimezone(UTC).astimezone(t.tzinfo)
    return back.replace(tzinfo=None) == t.replace(tzinfo=None)


def gap_end(t: dt.datetime) -> dt.datetime:
    """For a local time inside a gap: the instant the gap ends (UTC), found by bisection
    between the two readings of ``t`` (offset before and after the change)."""
    lo = t.replace(fold=1).astimezone(UTC)    # read with the later offset: before the change
    hi = t.replace(fold=0).astimezone(UTC)    # with the earlier offset: after it
    if lo > hi:
        lo, hi = hi, lo
    after = hi.astimezone(t.tzinfo).utcoffset()
    while hi - lo > dt.timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        mid = mid.replace(microsecond=0)
        if mid.astimezone(t.tzinfo).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    return hi


def parse(text: str) -> Cron:
    """A Cron from five fields (minute hour day-of-month month day-of-week) or a macro
    such as @daily; ValueError naming the field otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"must be a cron expression of five fields, got {text!r}")
    spec = _MACROS.get(text.strip().lower(), text)
    fields = spec.split()
    if len(fields) != 5:
        raise ValueError(f"must have five fields (minute hour day-of-month month "
                         f"day-of-week) or be a macro like @daily, got {text!r}")
    sets = [_field(f, *spec_) for f, spec_ in zip(fields, _FIELDS)]
    weekdays = frozenset(d % 7 for d in sets[4])
    return Cron(text=text.strip(), minutes=sets[0], hours=sets[1], days=sets[2],
                months=sets[3], weekdays=weekdays, dom_star=fields[2].startswith("*"),
                dow_star=fields[4].startswith("*"),
                wildcard=fields[0].startswith("*") or fields[1].startswith("*"))


def _field(text: str, name: str, low: int, high: int, names: tuple[str, ...]) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or not 0 < int(step_text) <= high:
                raise ValueError(f"{name}: bad step {step_text!r} in {text!r}")
            step = int(step_text)
        if base == "*":
            a, b = low, high
        elif "-" in base:
            x, _, y = base.partition("-")
            a, b = _value(x, name, low, high, names), _value(y, name, low, high, names)
            if a > b:
                raise ValueError(f"{name}: range {base!r} runs backwards")
        else:
            a = _value(base, name, low, high, names)
            b = high if slash else a   # "5/10" means 5-high/10, as cronie reads it
        out.update(range(a, b + 1, step))
    return frozenset(out)


def _value(text: str, name: str, low: int, high: int, names: tuple[str, ...]) -> int:
    t = text.lower()
    if names and t in names:
        return names.index(t) + low
    if not t.isdigit() or not low <= int(t) <= high:
        raise ValueError(f"{name}: {text!r} is not a value from {low} to {high}"
                         + (f" or a name ({names[0]}, {names[1]}, ...)" if names else ""))
    return int(t)


def zone(name: str) -> dt.tzinfo:
    """The zoneinfo time zone ``name`` (UTC for "UTC"); ValueError when unknown."""
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name:
        raise ValueError(f"must be a time zone name like Europe/Berlin, got {name!r}")
    try:
        return ZoneInfo(name)
    except (ValueError, OSError, LookupError):
        raise ValueError(f"unknown time zone {name!r} (a zoneinfo name like Europe/Berlin)") \
            from None
