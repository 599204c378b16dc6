"""workq-submit --delay, --at and --expires, run as a user runs them."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time

import pytest

from conftest import BROKER_URL, wait_for
from workqd import delays, vocab


def submit(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workqd.submit", "--url", BROKER_URL, *args],
                          capture_output=True, text=True, timeout=60)


def arrivals(amqp, queue: str, count: int, timeout: float) -> dict[bytes, float]:
    got: dict[bytes, float] = {}
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        for _, body in amqp.get_all(queue):
            got[body] = time.time()
        time.sleep(0.02)
    return got


def test_delay_and_at_hold_tasks_back_until_due(amqp, qname):
    amqp.declare(qname)
    start = time.time()
    at = datetime.datetime.fromtimestamp(start + 10,
                                         datetime.timezone(datetime.timedelta(hours=1)))
    r = submit("-q", qname, "--delay", "6s", "six")
    published = time.time()    # the delay counts from the publish, inside the command
    assert r.returncode == 0, r.stderr
    r = submit("-q", qname, "--at", at.isoformat(), "at")
    assert r.returncode == 0, r.stderr
    assert amqp.get_all(qname) == []
    got = arrivals(amqp, qname, 2, 25)
    assert set(got) == {b"six", b"at"}
    assert start + 6 <= got[b"six"] <= published + 6 + 1.5
    assert at.timestamp() - 0.05 <= got[b"at"] <= at.timestamp() + 1.5


def test_expires_is_written_for_the_worker_to_check(amqp, qname):
    amqp.declare(qname)
    r = submit("-q", qname, "--expires", "10m", "soon")
    assert r.returncode == 0, r.stderr
    ((props, _),) = wait_for(lambda: amqp.get_all(qname), 5, what="the task")
    assert abs(props.headers[vocab.H_EXPIRES_MS] / 1000 - (time.time() + 600)) < 30


def test_a_delayed_task_for_a_missing_queue_fails_with_one_line(broker):
    r = submit("-q", "no-such-queue-for-delays", "--delay", "5", "x")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "workq-submit: no queue no-such-queue-for-delays on amqp://guest:***@127.0.0.1:5672/%2F: "
        "a delayed task needs its queue to exist now"]


@pytest.mark.parametrize("args, line", [
    (["--delay", "5w"], "workq-submit: --delay: must be a duration like 90, 90s, 15m, 2h or "
                        "3d, got '5w'"),
    (["--at", "2026-12-24T03:00:00"], "workq-submit: --at: must carry its UTC offset "
                                      "(+01:00, Z), got '2026-12-24T03:00:00'"),
    (["--delay", "5", "--at", "2030-01-01T00:00:00Z"], "workq-submit: give --delay or --at, "
                                                        "not both"),
    (["--expires", "soon"], "workq-submit: --expires: must be a duration like 10m or a time "
                            "like 2026-12-24T03:00:00+01:00, got 'soon'"),
    (["--delay", "40000d"], "workq-submit: a task can be held back at most 100 years"),
])
def test_bad_timing_is_one_line_and_exit_2(args, line):
    r = submit(*args, "x")
    assert (r.returncode, r.stderr.strip().splitlines()) == (2, [line])


def test_a_long_delay_waits_in_the_top_level(amqp, qname):
    amqp.declare(qname)
    r = submit("-q", qname, "--delay", "400d", "later")
    assert r.returncode == 0, r.stderr
    top = delays.level_name(delays.LEVELS - 1)
    got = wait_for(lambda: [p for p, _ in amqp.get_all(top) if p.headers.get(delays.H_TO) == qname],
                   5, what="the task in the top level")
    assert len(got) == 1


def test_a_long_file_shows_its_progress_on_a_terminal_and_not_in_a_pipe(amqp, qname, tmp_path):
    import os
    import pty
    amqp.declare(qname, "classic")
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"task {i}\n" for i in range(30000)))
    argv = [sys.executable, "-m", "workqd.submit", "--url", BROKER_URL, "-q", qname,
            "--file", str(tasks)]
    # A terminal on stderr: the line appears while confirms come in.
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=secondary)
    os.close(secondary)
    seen = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:   # the other end closed: the command is done
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(120) == 0
    os.close(primary)
    assert b"/30000 confirmed" in seen, seen[-500:]
    # A pipe: only the closing line, as before.
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert r.stderr.strip().splitlines() == [f"workq-submit: 30000 task(s) confirmed on queue "
                                             f"{qname}"]
