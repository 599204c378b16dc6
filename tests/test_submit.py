"""workq-submit against the real broker: confirms, exit codes, files, --wait."""

from __future__ import annotations

import subprocess
import sys

import yaml

from conftest import BROKER_URL, free_port, queue_config, wait_for


def submit(*args, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workqd.submit", *args], input=stdin,
                          capture_output=True, timeout=timeout)


def test_words_become_one_persistent_confirmed_task(amqp, qname):
    amqp.declare(qname, "classic")
    r = submit("--url", BROKER_URL, "-q", qname, "--header", "team=ops", "--priority", "3",
               "--message-id", "m-1", "hello", "world...")
    assert r.returncode == 0, r.stderr
    (props, body), = amqp.get_all(qname)
    assert body == b"hello world..."
    assert props.delivery_mode == 2 and props.message_id == "m-1"
    assert props.headers == {"team": "ops"} and props.priority == 3


def test_unroutable_queue_exits_1_and_names_the_task():
    r = submit("--url", BROKER_URL, "-q", "no.such.queue.anywhere", "--message-id", "lost-1", "x")
    assert r.returncode == 1
    assert b"task lost-1 not accepted: unroutable" in r.stderr


def test_broker_down_exits_3():
    r = submit("--url", f"amqp://guest:guest@127.0.0.1:{free_port()}/", "x")
    assert r.returncode == 3
    assert b"cannot connect" in r.stderr and b"Traceback" not in r.stderr


def test_bad_arguments_exit_2():
    for args in (["--header", "novalue", "x"], ["--priority", "999", "x"],
                 ["--timeout", "3", "x"], ["--url", "http://nope", "x"],
                 ["--message-id", "a", "--file", "-"], ["--no-such-flag"]):
        r = submit(*args, stdin=b"a\nb\n")
        assert r.returncode == 2, (args, r.stderr)
        assert b"Traceback" not in r.stderr


def test_file_of_10000_lines_all_arrive(amqp, qname, tmp_path):
    amqp.declare(qname, "classic")
    lines = tmp_path / "tasks.txt"
    lines.write_text("".join(f"task {i}\n" for i in range(10_000)) + "\n\n")
    r = submit("--url", BROKER_URL, "-q", qname, "--file", str(lines))
    assert r.returncode == 0, r.stderr
    assert b"10000 task(s) confirmed" in r.stderr
    assert amqp.count(qname) == 10_000
    bodies = {body for _, body in amqp.get_all(qname)}
    assert bodies == {f"task {i}".encode() for i in range(10_000)}


def test_stdin_and_config_declares_queue_like_the_daemon(amqp, qname, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"broker": {"url": BROKER_URL},
                                   "queues": [queue_config(qname, type="quorum")]}))
    r = submit("-c", str(cfg), "-", stdin=b"one\ntwo\n")  # a lone "-" reads stdin
    assert r.returncode == 0, r.stderr
    r = submit("-c", str(cfg), "--file", "-", stdin=b"three\n")
    assert r.returncode == 0, r.stderr
    assert sorted(body for _, body in amqp.get_all(qname)) == [b"one", b"three", b"two"]
    for body in (b"x", b"y"):
        amqp.publish(qname, body)
    args = amqp.channel().queue_declare(qname, durable=True, arguments={"x-queue-type": "quorum"})
    assert args.method.message_count == 2  # same arguments: redeclaring is accepted


def test_wait_reports_outcomes(daemon, amqp, qname):
    daemon([queue_config(qname, workers=2)])
    r = submit("--url", BROKER_URL, "-q", qname, "--wait", "--timeout", "20",
               "--message-id", "ok-1", "sleep=0.1")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().split()
    assert out[:2] == ["ok-1", "success"]
    r = submit("--url", BROKER_URL, "-q", qname, "--wait", "--timeout", "20",
               "--message-id", "bad-1", "fail=1")
    assert r.returncode == 1
    assert r.stdout.decode().startswith("bad-1 dead_letter")


def test_wait_timeout_exits_4(daemon, amqp, qname):
    daemon([queue_config(qname, workers=1)])
    r = submit("--url", BROKER_URL, "-q", qname, "--wait", "--timeout", "1", "sleep=5")
    assert r.returncode == 4, r.stderr
    wait_for(lambda: amqp.count(qname) == 0, 10, what="task taken")


def test_wait_hears_the_outcome_of_a_task_finished_during_stop(daemon, amqp, qname):
    import signal
    d = daemon([queue_config(qname, workers=1)])
    waiter = subprocess.Popen([sys.executable, "-m", "workqd.submit", "--url", BROKER_URL,
                               "-q", qname, "--wait", "--timeout", "20", "--message-id", "s-1",
                               "sleep=1.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: d.ledger.events("start"), 10, what="task running")
    assert d.stop(signal.SIGTERM) == 0
    out, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 0, err
    assert out.decode().startswith("s-1 success")
