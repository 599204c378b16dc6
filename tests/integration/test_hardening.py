"""Hostile input at the daemon's edges, against real processes and the real broker:
the control socket's path and its stale check, deep JSON, control characters on an
operator's terminal, a command flooding its output."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import BROKER_URL, ROOT, queue_config, wait_for

CSI = "\x9b"   # C1 control: a terminal reads it as ESC [


def _ctl(sock: str, *args: str, config: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    where = ("-c", config) if config else ("--socket", sock)
    return subprocess.run([sys.executable, "-m", "workqd.ctl", *where, *args],
                          capture_output=True, text=True, env=env, timeout=60)


def _start(daemon, tmp_path, queues, **top):
    sock = str(tmp_path / "c.sock")
    d = daemon(queues, control={"socket": sock}, **top)
    d.sock = sock
    return d


def _full_backlog(path: str) -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket at ``path`` that accepts nothing, its backlog filled."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    queued = []
    for _ in range(64):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return listener, queued
        queued.append(s)
    raise AssertionError("the backlog never filled")


# --- the stale-socket check --------------------------------------------------------

def test_a_second_daemon_refuses_a_socket_whose_backlog_is_full_and_leaves_it(
        daemon, qname, tmp_path):
    path = str(tmp_path / "busy.sock")
    listener, queued = _full_backlog(path)
    try:
        inode = os.stat(path).st_ino
        d = daemon([queue_config(qname, workers=1)], start=False, control={"socket": path})
        d.start(wait_ready=False)
        assert d.proc.wait(30) != 0
        assert os.stat(path).st_ino == inode, "the live socket was removed"
        lines = [line for line in d.log().splitlines() if path in line]
        assert len(lines) == 1 and "another workqd is listening there" in lines[0], d.log()
        assert "Traceback" not in d.log()
    finally:
        for s in queued:
            s.close()
        listener.close()


def test_a_socket_the_daemon_cannot_connect_to_is_refused_not_removed():
    # Root passes every permission check, so the probe runs as nobody.
    base = Path(tempfile.mkdtemp(prefix="workqd-stale-", dir="/tmp"))
    try:
        base.chmod(0o755)
        path = str(base / "c.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(1)
        os.chmod(path, 0o600)
        probe = ("import sys\nfrom workqd.control import ControlServer\n"
                 "try:\n    ControlServer._remove_stale(sys.argv[1])\n"
                 "except OSError as e:\n    print(e)\n")
        r = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup",
                            "--clear-groups", "/usr/bin/python3", "-c", probe, path],
                           capture_output=True, text=True, timeout=30, cwd="/",
                           env={"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]})
        assert r.returncode == 0, r.stderr
        assert r.stdout == (f"{path}: cannot tell whether another workqd is listening there "
                            f"(Permission denied); remove it by hand if none is\n")
        assert os.path.exists(path)
        listener.close()
    finally:
        for p in base.iterdir():
            p.unlink()
        base.rmdir()


# --- deep JSON ----------------------------------------------------------------------

def test_deeply_nested_requests_get_one_answer_and_the_connection_stays(daemon, qname,
                                                                        tmp_path):
    d = _start(daemon, tmp_path, [queue_config(qname, workers=1)])
    deep = b"[" * 2000 + b"]" * 2000
    inside = b'{"v": 1, "cmd": "status", "x": ' + b"{\"a\":" * 600 + b"1" + b"}" * 600 + b"}"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(d.sock)
        f = s.makefile("rwb")
        for line in (deep, inside):
            f.write(line + b"\n")
            f.flush()
            answer = json.loads(f.readline())
            assert answer["ok"] is False and "nested too deep" in answer["error"], answer
        f.write(b'{"v": 1, "cmd": "status"}\n')
        f.flush()
        assert json.loads(f.readline())["ok"] is True
    assert "RecursionError" not in d.log() and "unexpected error" not in d.log()
    assert d.proc.poll() is None


# --- control characters on the operator's terminal ------------------------------------

def test_c1_controls_are_escaped_in_workqctl_status(daemon, amqp, qname, tmp_path):
    d = _start(daemon, tmp_path, [queue_config(qname, workers=1)])
    busy_id = f"busy{CSI}2J"
    amqp.publish(qname, "sleep=3", message_id=busy_id)

    def showing_it():   # the table that showed it: a second call may come after the task
        out = _ctl(d.sock, "status").stdout
        return out if "busy\\x9b2J" in out else None
    table = wait_for(showing_it, 20, what="the busy message's id in workqctl status")
    assert CSI not in table and "busy\\x9b2J" in table
    refused = _ctl(d.sock, "pause", f"q{CSI}").stderr
    assert CSI not in refused and refused.startswith("workqctl: no queue 'q\\x9b'")


def test_c1_controls_are_escaped_in_submit_wait_and_dead_show(daemon, qname, tmp_path):
    d = _start(daemon, tmp_path, [queue_config(qname, workers=1)])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "workqd.submit", "--url", BROKER_URL, "-q", qname,
                        "--wait", "--timeout", "60", "--message-id", f"w{CSI}1",
                        f"n={CSI}31m fail=1"], capture_output=True, text=True, env=env,
                       timeout=90)
    assert CSI not in r.stdout, r.stdout
    assert r.stdout.startswith("w\\x9b1 dead_letter") and "task \\x9b31m failed" in r.stdout, \
        (r.stdout, r.stderr)
    assert d.stop() == 0
    r = _ctl(d.sock, "dead", qname, "show", f"w{CSI}1", config=str(d.path))
    assert r.returncode == 0, r.stderr
    assert CSI not in r.stdout
    assert "message id: w\\x9b1" in r.stdout and "n=\\x9b31m fail=1" in r.stdout
    listed = _ctl(d.sock, "dead", qname, "list", config=str(d.path)).stdout
    assert CSI not in listed and "w\\x9b1" in listed


# --- a command flooding its output --------------------------------------------------------

def _status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def test_a_command_writing_50_mb_keeps_its_worker_small_and_succeeds(daemon, amqp, qname,
                                                                     tmp_path):
    script = tmp_path / "flood.sh"
    script.write_text("#!/bin/sh\nyes 'a line of output' | head -c 50000000\n"
                      "head -c 3000000 /dev/zero | tr '\\0' e >&2\n")
    script.chmod(0o755)
    d = daemon([queue_config(qname, workers=1, handler={"command": [str(script)]})])
    worker, = d.worker_pids()
    before = _status_kib(worker, "VmRSS")
    amqp.publish(qname, "go")
    wait_for(lambda: d.metric("workqd_tasks_processed_total", queue=qname,
                              outcome="success") == 1, 90, what="the flooding task done")
    assert d.worker_pids() == [worker]
    peak = _status_kib(worker, "VmHWM")
    print(f"\nworker VmRSS before the task {before} kB, its peak (VmHWM) after {peak} kB")
    # The worker's own peak, not the handler's: its growth is far below the 53 MB.
    assert peak - before < 16 << 10, (before, peak)
    log = d.log()
    assert f"stdout: ... {50_000_000 - (64 << 10)} more bytes dropped" in log
    assert f"stderr: ... {3_000_000 - (64 << 10)} more bytes dropped" in log
    assert "stdout: a line of output" in log
    assert "more characters)" in log       # the 3 MB line of stderr is cut in the log
    assert max(len(line) for line in log.splitlines()) < 2200


def test_log_lines_escape_c1_controls_as_they_do_c0():
    from workqd import logsetup
    assert logsetup._escape(f"id {CSI}2J\x1b[0m\x85") == "id \\x9b2J\\x1b[0m\\x85"
    assert logsetup._escape("naïve ü") == "naïve ü"    # printable text beyond ASCII stays
