"""Handlers as deployments need them: permanent failures, graceful timeouts,
per-queue environments, message metadata for commands. Real broker, real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import queue_config, wait_for

OUTCOME = "workqd_tasks_processed_total"


def _script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("kind", ["python", "command"])
def test_a_rejected_task_runs_once_and_is_dead_lettered(daemon, amqp, qname, tmp_path, kind):
    runs = tmp_path / "runs"
    handler = ({"python": "taskfns:reject"} if kind == "python" else
               {"command": [_script(tmp_path, "reject.sh",
                                    f"#!/bin/sh\necho run >> {runs}\necho 'bad input' >&2\n"
                                    f"exit 65\n")]})
    d = daemon([queue_config(qname, workers=1, handler=handler,
                             retry={"attempts": 3, "backoff": [0]})])
    mid = amqp.publish(qname, "not-an-image")
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 20, what="dead-lettered")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 1, 10,
             what="dead_letter counted")
    (props, body), = amqp.get_all(f"{qname}.dead")
    assert props.message_id == mid and body == b"not-an-image"
    assert props.headers["x-workq-reason"] == "rejected"
    assert props.headers["x-workq-attempt"] == 1
    if kind == "python":
        assert "cannot use" in props.headers["x-workq-error"]
        assert len(d.ledger.events("start")) == 1
    else:
        assert "exit status 65: bad input" in props.headers["x-workq-error"]
        assert runs.read_text().splitlines() == ["run"]
    assert d.metric(OUTCOME, queue=qname, outcome="retry") == 0
    assert amqp.count(qname) == 0


def test_a_deferred_task_keeps_its_try_and_succeeds_later(daemon, amqp, qname, tmp_path):
    # Exit 75 twice (a service it needs is down), then 0. With attempts: 1 there is no
    # retry at all: the task still runs to success, because a deferral is no try.
    runs = tmp_path / "runs"
    script = _script(tmp_path, "later.sh",
                     f"#!/bin/sh\necho \"$WORKQ_ATTEMPT\" >> {runs}\n"
                     f"[ $(wc -l < {runs}) -ge 3 ] && exit 0\necho 'db down' >&2\nexit 75\n")
    d = daemon([queue_config(qname, workers=1, handler={"command": [script]},
                             retry={"attempts": 1, "backoff": [0.5]})])
    amqp.publish(qname, "x")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="success") == 1, 20,
             what="success after two deferrals")
    assert runs.read_text().split() == ["1", "1", "1"]
    assert d.metric(OUTCOME, queue=qname, outcome="deferred") == 2
    assert d.metric(OUTCOME, queue=qname, outcome="retry") == 0
    assert amqp.count(qname) == 0 and amqp.count(f"{qname}.dead") == 0
    assert "deferred by its handler (2 of 10): " in d.log()


def test_deferrals_are_bounded_then_count_as_failures(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1, handler={"python": "taskfns:later"},
                             retry={"attempts": 2, "backoff": [0.5], "max_deferrals": 2})])
    mid = amqp.publish(qname, "x")
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 30, what="dead-lettered at last")
    starts = d.ledger.events("start")
    # Try 1 deferred twice, then failed; try 2 is out of deferrals too: 4 runs in all.
    assert [(s["attempt"], s["deferrals"]) for s in starts] == [(1, 0), (1, 1), (1, 2), (2, 2)]
    (props, _), = amqp.get_all(f"{qname}.dead")
    assert props.message_id == mid and props.headers["x-workq-reason"] == "failed"
    error = props.headers["x-workq-error"]
    assert "the database is down" in error, error
    assert error.endswith("(deferred 2 time(s): retry.max_deferrals)"), error
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 1, 5,
             what="dead_letter counted")
    assert d.metric(OUTCOME, queue=qname, outcome="deferred") == 2
    assert d.metric(OUTCOME, queue=qname, outcome="retry") == 1


def test_a_timed_out_command_that_traps_term_cleans_up_within_the_grace(daemon, amqp, qname,
                                                                         tmp_path):
    cleaned = tmp_path / "cleaned"
    started = tmp_path / "started"
    # exec: the trap must be in the process the group's SIGTERM reaches (no sh -> sleep gap).
    script = _script(tmp_path, "trap.sh", f"""#!/bin/sh
trap 'echo cleaned > {cleaned}; exit 3' TERM
touch {started}
while :; do sleep 0.1; done
""")
    d = daemon([queue_config(qname, workers=1, timeout=1, timeout_grace=20,
                             handler={"command": [script]}, retry={"attempts": 1})])
    amqp.publish(qname, "x")
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 30, what="dead-lettered as timeout")
    assert cleaned.read_text() == "cleaned\n"
    (props, _), = amqp.get_all(f"{qname}.dead")
    assert props.headers["x-workq-reason"] == "timeout"
    assert "stopped on SIGTERM within its grace" in props.headers["x-workq-error"]
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="timeout") == 1, 10,
             what="timeout counted")


def test_a_timed_out_command_that_ignores_term_is_killed_after_the_grace(daemon, amqp, qname,
                                                                        tmp_path):
    pidfile = tmp_path / "pid"
    script = _script(tmp_path, "stubborn.sh", f"""#!/bin/sh
trap '' TERM
echo $$ > {pidfile}
while :; do sleep 0.1; done
""")
    d = daemon([queue_config(qname, workers=1, timeout=1, timeout_grace=1,
                             handler={"command": [script]}, retry={"attempts": 1})])
    amqp.publish(qname, "x")
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 30, what="dead-lettered as timeout")
    (props, _), = amqp.get_all(f"{qname}.dead")
    assert props.headers["x-workq-reason"] == "timeout"
    assert "was killed after a grace of 1s" in props.headers["x-workq-error"]
    pid = int(pidfile.read_text())
    wait_for(lambda: not Path(f"/proc/{pid}").exists()
             or Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z", 10,
             what="the stubborn handler gone")
    # The dead letter is confirmed before the outcome is counted in the worker's slot.
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="timeout") == 1, 10,
             what="the timeout counted")


def test_a_python_handler_sees_its_deadline(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1, timeout=30, handler={"python": "taskfns:deadline"})])
    amqp.publish(qname, "x")
    wait_for(lambda: d.ledger.events("start"), 15, what="handler ran")
    left = d.ledger.events("start")[0]["left"]
    assert 0 < left <= 30


# --- the handler's environment -------------------------------------------------------

def _wheel(tmp_path: Path, name: str, module_source: str) -> Path:
    """A minimal wheel of one module, built by hand: no build backend, no network."""
    import zipfile
    dist = f"{name}-1.0.dist-info"
    files = {f"{name}.py": module_source,
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}/RECORD,,\n"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    path = wheels / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return wheels


def test_a_python_handler_runs_from_its_own_virtualenv(daemon, amqp, qname, tmp_path):
    srv = tmp_path / "srv" / "app"
    srv.mkdir(parents=True)
    package = f"wqapp_{qname.rsplit('.', 1)[1]}"
    with pytest.raises(ImportError):
        __import__(package)   # the daemon's interpreter does not have it
    wheels = _wheel(tmp_path, package, f"""
import os, sys
def handle(body, task):
    # Written aside and renamed: the test polls for the file and must never read it half done.
    with open({str(srv / 'out.tmp')!r}, 'w') as f:
        f.write(repr([body.decode(), os.getcwd(), os.environ.get('APP_MODE'),
                      os.environ.get('NOTIFY_SOCKET'), os.environ.get('WORKQ_PASSWORD'),
                      __file__, os.environ.get('WORKQ_TEST_LEDGER')]))
    os.replace({str(srv / 'out.tmp')!r}, {str(srv / 'out')!r})
""")
    venv = srv / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--find-links",
                    str(wheels), package], check=True, timeout=120)
    d = daemon([queue_config(qname, workers=1, handler={
        "python": f"{package}:handle", "virtualenv": str(venv),
        "working_directory": str(srv), "environment": {"APP_MODE": "prod"}})], start=False)
    notify = tmp_path / "notify.sock"
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    base_env = d.env
    d.env = lambda: {**base_env(), "NOTIFY_SOCKET": str(notify), "WORKQ_PASSWORD": "hunter2"}
    d.start()
    amqp.publish(qname, "resize me")
    wait_for(lambda: (srv / "out").exists(), 20, what=lambda: f"handler ran; log:\n{d.log()}")
    body, cwd, mode, notify_seen, password, where, inherited = eval((srv / "out").read_text())
    assert inherited == str(d.ledger.path)   # the rest of workqd's environment is kept
    assert (body, cwd, mode) == ("resize me", str(srv), "prod")
    assert notify_seen is None and password is None
    assert where.startswith(str(venv))
    sock.close()


def test_a_command_gets_its_environment_and_working_directory(daemon, amqp, qname, tmp_path):
    out = tmp_path / "env.out"
    work = tmp_path / "work"
    work.mkdir()
    script = _script(tmp_path, "env.sh", f"#!/bin/sh\npwd > {out}\nenv >> {out}\n")
    d = daemon([queue_config(qname, workers=1, handler={
        "command": [script], "working_directory": str(work),
        "environment": {"APP_MODE": "prod", "LANG": "C.UTF-8"}})], start=False)
    base_env = d.env
    d.env = lambda: {**base_env(), "WORKQ_PASSWORD": "hunter2", "WATCHDOG_PID": "1",
                     "LISTEN_FDS": "1", "LISTEN_PID": "1"}
    d.start()
    amqp.publish(qname, "x")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="success") == 1, 20, what="ran")
    lines = out.read_text().splitlines()
    assert lines[0] == str(work)
    env = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    assert env["APP_MODE"] == "prod" and env["LANG"] == "C.UTF-8" and env["WORKQ_QUEUE"] == qname
    for hidden in ("WORKQ_PASSWORD", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET"):
        assert hidden not in env


def _check(tmp_path: Path, handler: dict) -> subprocess.CompletedProcess:
    import yaml
    cfg = tmp_path / "check.yaml"
    cfg.write_text(yaml.safe_dump({"queues": [{"name": "q", "handler": handler}]}))
    return subprocess.run([sys.executable, "-m", "workqd.cli", "--check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60)


def test_check_refuses_a_virtualenv_of_another_python(tmp_path):
    venv = tmp_path / "oldvenv"
    (venv / "lib" / "python2.7" / "site-packages").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n"
                                     "version = 2.7.18\n")
    r = _check(tmp_path, {"python": "app:handle", "virtualenv": str(venv)})
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert "queues[0].handler.virtualenv" in lines[0]
    assert f"built for Python 2.7 (pyvenv.cfg), this is Python {here}" in lines[0]
    r = _check(tmp_path, {"python": "app:handle", "virtualenv": str(tmp_path)})
    assert r.returncode == 2 and "is not a virtualenv" in r.stderr, r
    r = _check(tmp_path, {"command": ["/bin/true"], "virtualenv": str(venv),
                          "environment": {"WORKQ_X": "1"}})
    assert r.returncode == 2 and "applies to python: handlers only" in r.stderr, r
    assert "WORKQ_* variables are workqd's own" in r.stderr


# --- message metadata for commands ------------------------------------------------

def test_a_command_reads_its_task_from_the_metadata_document(daemon, amqp, qname, tmp_path):
    out = tmp_path / "meta.json"
    # Read twice: /dev/fd/N reopens the memfd, so every reader starts at the beginning.
    script = _script(tmp_path, "meta.sh", f"#!/bin/sh\ncat /dev/fd/$WORKQ_META_FD > {out}\n"
                                          f"cat /dev/fd/$WORKQ_META_FD > {out}.2\n")
    d = daemon([queue_config(qname, workers=1, handler={"command": [script]})])
    mid = amqp.publish(qname, "body", headers={"tenant": "acme", "size": 3, "raw": b"\xff",
                                               "tags": ["a", "b"]},
                       content_type="image/png", correlation_id="c-1", app_id="uploader")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="success") == 1, 20, what="ran")
    doc = json.loads(out.read_text())
    assert out.read_text() == Path(f"{out}.2").read_text()
    assert doc["headers"] == {"tenant": "acme", "size": 3, "raw": "\ufffd", "tags": ["a", "b"]}
    assert doc["properties"]["content_type"] == "image/png"
    assert doc["properties"]["correlation_id"] == "c-1" and doc["properties"]["app_id"] == "uploader"
    assert doc["properties"]["message_id"] == mid == doc["message_id"]
    assert (doc["queue"], doc["routing_key"], doc["exchange"]) == (qname, qname, "")
    assert (doc["redelivered"], doc["delivery_count"], doc["attempt"]) == (False, 0, 1)
    assert doc["deadline"] > 0 and doc["deadline_utc"].endswith("+00:00")
