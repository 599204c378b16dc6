"""The schedules section of workqd.yaml: what is taken and the one line for what is not."""

import pytest

from workqd import config
from workqd.config.model import Schedule

HANDLER = {"python": "workqd.handlers:noop"}


def parse(*entries):
    return config.parse({"queues": [{"name": "tasks", "handler": HANDLER}],
                         "schedules": list(entries)}, "x.yaml")


def problems(*entries) -> list[str]:
    with pytest.raises(config.ConfigError) as e:
        parse(*entries)
    return e.value.problems


def test_the_issue_example():
    cfg = parse({"name": "nightly-report", "cron": "0 3 * * *", "timezone": "Europe/Berlin",
                 "queue": "reports", "body": "nightly", "headers": {"kind": "report"},
                 "catch_up": "last"})
    assert cfg.schedules == (Schedule(name="nightly-report", queue="reports", cron="0 3 * * *",
                                      timezone="Europe/Berlin", body="nightly",
                                      headers=(("kind", "report"),), catch_up="last"),)


@pytest.mark.parametrize("every,seconds", [("15m", 900.0), ("2s", 2.0), (90, 90.0), ("1d", 86400.0)])
def test_every(every, seconds):
    (s,) = parse({"name": "s", "every": every, "queue": "q"}).schedules
    assert s.every == seconds and s.cron is None and s.catch_up == "none"


def test_no_schedules_is_an_empty_tuple():
    assert config.parse({"queues": [{"name": "tasks", "handler": HANDLER}]}, "x").schedules == ()


@pytest.mark.parametrize("entry,line", [
    ({"name": "s", "queue": "q"}, "x.yaml: schedules[0]: give exactly one of cron and every"),
    ({"name": "s", "queue": "q", "cron": "* * * * *", "every": 5},
     "x.yaml: schedules[0]: give exactly one of cron and every"),
    ({"name": "s", "queue": "q", "cron": "0 25 * * *"},
     "x.yaml: schedules[0].cron: hour: '25' is not a value from 0 to 23"),
    ({"name": "s", "queue": "q", "every": "1.5s"},
     "x.yaml: schedules[0].every: must be whole seconds from 1s to 366d, got \"1.5s\""),
    ({"name": "s", "queue": "q", "every": "soon"},
     "x.yaml: schedules[0].every: must be a duration like 90, 90s, 15m, 2h or 3d, got 'soon'"),
    ({"name": "s t", "queue": "q", "every": 5},
     "x.yaml: schedules[0].name: must be 1 to 100 of A-Z a-z 0-9 . _ -, got \"s t\""),
    ({"name": "s", "every": 5}, "x.yaml: schedules[0].queue: is required"),
    ({"name": "s", "queue": "q", "cron": "@daily", "timezone": "Nowhere/Land"},
     "x.yaml: schedules[0].timezone: unknown time zone 'Nowhere/Land' (a zoneinfo name like "
     "Europe/Berlin)"),
    ({"name": "s", "queue": "q", "every": 5, "catch_up": "all"},
     "x.yaml: schedules[0].catch_up: must be one of none, last, got \"all\""),
    ({"name": "s", "queue": "q", "every": 5, "headers": {"x-workq-slot": "a"}},
     "x.yaml: schedules[0].headers: \"x-workq-slot\": a header name is 1 to 128 characters, "
     "not x-workq-*"),
    ({"name": "s", "queue": "q", "every": 5, "headers": {"a": [1]}},
     "x.yaml: schedules[0].headers: a: must be a string (at most 4096 characters) or a "
     "number, got [1]"),
    ("nightly", "x.yaml: schedules[0]: must be a mapping with name, queue and cron or every, "
     "got \"nightly\""),
])
def test_one_line_per_problem(entry, line):
    assert problems(entry) == [line]


def test_names_are_unique():
    assert problems({"name": "s", "queue": "q", "every": 5},
                    {"name": "s", "queue": "r", "every": 6}) == [
        "x.yaml: schedules[1].name: 's' is given twice"]


def test_timezone_with_every_is_a_warning():
    cfg = parse({"name": "s", "queue": "q", "every": 5, "timezone": "Europe/Berlin"})
    assert cfg.warnings == ("x.yaml: schedules[0].timezone: is not used with every (its slots "
                            "count from the epoch, in UTC)",)
