"""The control protocol and server, in-process: parsing, framing, budgets (no daemon)."""

from __future__ import annotations

import json
import os
from pathlib import Path
import selectors
import socket
import time

import pytest

from workqd import control
from workqd.control import ControlServer, ProtocolError, answer_line, parse_request


@pytest.mark.parametrize("line, why", [
    (b"{", "not JSON"), (b"\xff", "not UTF-8"), (b"[]", "JSON object"), (b"3", "JSON object"),
    (b'{"cmd": "status"}', "version"), (b'{"v": "1", "cmd": "status"}', "version"),
    (b'{"v": 1}', "cmd"), (b'{"v": 1, "cmd": ""}', "cmd"), (b'{"v": 1, "cmd": 3}', "cmd"),
])
def test_parse_request_refuses(line, why):
    with pytest.raises(ProtocolError, match=why):
        parse_request(line)


def test_parse_request_accepts_a_versioned_command():
    assert parse_request(b'{"v": 1, "cmd": "pause", "queue": "q"}') == {
        "v": 1, "cmd": "pause", "queue": "q"}


def test_answer_line_never_raises():
    def boom(req):
        raise KeyError("x")
    out = json.loads(answer_line(b'{"v":1,"cmd":"status"}', boom))
    assert out["ok"] is False and "internal error" in out["error"] and out["v"] == 1
    refused = json.loads(answer_line(b'{"v":1,"cmd":"x"}', lambda r: (_ for _ in ()).throw(
        ProtocolError("no such thing"))))
    assert refused == {"v": 1, "ok": False, "error": "no such thing"}
    assert json.loads(answer_line(b'{"v":1,"cmd":"x"}', lambda r: [])) ["ok"] is False
    assert json.loads(answer_line(b'{"v":1,"cmd":"x"}', lambda r: {"ok": True, "n": 1})) == {
        "v": 1, "ok": True, "n": 1}


def test_socket_paths(tmp_path, monkeypatch):
    cfg = str(tmp_path / "orders.yaml")
    assert control.server_path("/x/c.sock", cfg, {}) == "/x/c.sock"
    assert control.server_path(None, cfg, {"RUNTIME_DIRECTORY": "/run/workqd/orders"}) == \
        "/run/workqd/orders/control.sock"
    assert control.run_dir_path("/etc/workqd/workqd.yaml") == "/run/workqd/control.sock"
    assert control.run_dir_path("/etc/workqd/orders.yaml") == "/run/workqd-orders/control.sock"
    assert control.client_paths(None, cfg) == ["/run/workqd-orders/control.sock",
                                               str(tmp_path / "orders.sock")]
    # Without systemd the daemon uses the run directory only if it exists and it may write
    # there. A run directory of the test's own stands in for the machine's /run/workqd,
    # whose state is not the test's to depend on.
    run = tmp_path / "run"
    monkeypatch.setattr(control, "RUN_DIR", str(run))
    assert control.server_path(None, cfg, {}) == str(tmp_path / "orders.sock")
    Path(f"{run}-orders").mkdir(parents=True)
    assert control.server_path(None, cfg, {}) == f"{run}-orders/control.sock"


def _unit(name: str) -> dict[str, str]:
    units = os.path.join(os.path.dirname(__file__), "..", "..", "packaging", "systemd")
    keys = {}
    with open(os.path.join(units, name)) as f:
        for line in f:
            key, eq, value = line.strip().partition("=")
            if eq and not line.startswith("#"):
                keys.setdefault(key, value)
    return keys


@pytest.mark.parametrize("unit, instance", [("workqd.service", ""),
                                            ("workqd@.service", "orders")])
def test_each_unit_runs_its_daemon_where_workqctl_looks(unit, instance):
    keys = _unit(unit)
    config = keys["ExecStart"].split(" -c ")[1].replace("%i", instance)
    runtime = "/run/" + keys["RuntimeDirectory"].replace("%i", instance)
    env = {"RUNTIME_DIRECTORY": runtime}
    assert control.server_path(None, config, env) == control.client_paths(None, config)[0]


class Loop:
    """Drives a ControlServer as the master does: select, callbacks, expire."""

    def __init__(self, path: str, app):
        self.sel = selectors.PollSelector()
        self.server = ControlServer(self.sel, path, app)

    def turn(self, timeout: float = 0.01) -> None:
        for key, mask in self.sel.select(timeout):
            key.data(mask)
        self.server.expire(time.monotonic())

    def until(self, predicate, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.turn()
            value = predicate()
            if value:
                return value
        raise AssertionError("timed out")


def _read_until(sock: socket.socket, loop: Loop, done) -> bytes:
    """What the server sent on ``sock`` once ``done(bytes so far)`` holds (turning the loop)."""
    buf = b""
    sock.setblocking(False)

    def got():
        nonlocal buf
        try:
            buf += sock.recv(65536)
        except BlockingIOError:
            pass
        return done(buf)
    loop.until(got)
    return buf


def _line(sock: socket.socket, loop: Loop) -> dict:
    return json.loads(_read_until(sock, loop, lambda b: b"\n" in b).split(b"\n")[0])


def test_server_answers_in_order_caps_requests_and_budget(tmp_path):
    calls = []
    loop = Loop(str(tmp_path / "c.sock"), lambda r: (calls.append(r["n"]), {"ok": True,
                                                                              "n": r["n"]})[1])
    assert os.stat(tmp_path / "c.sock").st_mode & 0o777 == 0o660
    c = socket.socket(socket.AF_UNIX)
    c.connect(str(tmp_path / "c.sock"))
    # More requests at once than one turn may answer: all answered, in order, over turns.
    c.sendall(b"".join(b'{"v":1,"cmd":"x","n":%d}\n' % i for i in range(40)))
    buf = _read_until(c, loop, lambda b: b.count(b"\n") == 40)
    assert [json.loads(x)["n"] for x in buf.splitlines()] == list(range(40)) == calls
    c.close()
    big = socket.socket(socket.AF_UNIX)
    big.connect(str(tmp_path / "c.sock"))
    big.sendall(b"y" * (control.MAX_REQUEST + 10))
    assert "over" in _line(big, loop)["error"]
    loop.until(lambda: loop.server.client_count() == 0)
    big.setblocking(True)
    try:   # one answer, then closed (reset: the rest of its input was never read)
        assert big.recv(100) == b""
    except ConnectionResetError:
        pass
    big.close()
    # A last request without its newline, then EOF: still answered.
    last = socket.socket(socket.AF_UNIX)
    last.connect(str(tmp_path / "c.sock"))
    last.sendall(b'{"v":1,"cmd":"x","n":99}')
    last.shutdown(socket.SHUT_WR)
    assert _line(last, loop) == {"v": 1, "ok": True, "n": 99}
    last.close()
    loop.server.stop()
    assert not (tmp_path / "c.sock").exists()


def test_server_closes_idle_clients_and_evicts_the_oldest(tmp_path, monkeypatch):
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.2)
    loop = Loop(str(tmp_path / "c.sock"), lambda r: {"ok": True})
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(str(tmp_path / "c.sock"))
    loop.until(lambda: loop.server.client_count() == 1)
    loop.until(lambda: loop.server.client_count() == 0, timeout=3)
    idle.close()
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 30)
    clients = []
    for _ in range(control.MAX_CLIENTS + 3):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(tmp_path / "c.sock"))
        clients.append(s)
        loop.turn()
    loop.until(lambda: loop.server.client_count() == control.MAX_CLIENTS)
    newest = clients[-1]
    newest.sendall(b'{"v":1,"cmd":"status"}\n')
    assert _line(newest, loop) == {"v": 1, "ok": True}
    for s in clients:
        s.close()
    loop.server.stop()


def test_a_live_socket_is_not_taken_over_and_a_stale_one_is(tmp_path):
    path = str(tmp_path / "c.sock")
    first = Loop(path, lambda r: {"ok": True})
    with pytest.raises(OSError, match="another workqd"):
        ControlServer(selectors.PollSelector(), path, lambda r: {"ok": True})
    first.server.close_in_child()     # as if killed: the file stays, nobody listens
    assert os.path.exists(path)
    second = Loop(path, lambda r: {"ok": True})
    second.server.stop()


def _view(name: str, paused: bool):
    from workqd import state
    from workqd.slots import COUNTER_WORDS
    return state.QueueView(name=name, size=2, pool_state="running",
                           counters=state.frozen(dict.fromkeys(COUNTER_WORDS, 0)),
                           restarts=state.frozen({}), workers=(), consuming=0 if paused else 2,
                           depth=None, paused=paused,
                           state=state.Q_PAUSED if paused else state.Q_RUNNING)


def test_status_line_and_readiness_say_paused():
    from workqd import state
    from workqd.master import Master
    snap = state.Snapshot(phase=state.READY, queues=(_view("a", True), _view("b", False)),
                          broker_connected=True, loop_age=0.1, version="x")
    assert Master.status_text(snap).endswith("; paused: a")
    assert snap.readiness() == (False, "queue a: paused (workqctl resume)")
    quiet = state.Snapshot(phase=state.READY, queues=(_view("a", True), _view("b", True)),
                           broker_connected=True, loop_age=0.1, version="x")
    assert Master.status_text(quiet).endswith("; quiet: every queue paused")


@pytest.mark.parametrize("workers, problem", [
    ({"min": 5, "max": 4}, "min 5 is above max 4"),
    ({"min": 1}, "needs both min and max"),
    ({"min": 1, "max": 3, "spare": 1}, 'unknown key(s) "spare"'),
    ({"min": 1, "max": 300}, "max must be at most 256"),
    ({"min": 0, "max": 3}, "min must be a whole number >= 1"),
    ({"min": 1, "max": 3, "idle_after": 0}, "idle_after must be a number of seconds >= 1"),
])
def test_autoscale_config_refused(workers, problem):
    from workqd import config
    with pytest.raises(config.ConfigError) as e:
        config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"},
                                  "workers": workers}]}, "f.yaml")
    (line,) = e.value.problems
    assert line.startswith("f.yaml: queues[0].workers: ") and problem in line, line


def test_autoscale_config_and_the_total_cap():
    from workqd import config
    q = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"},
                                  "workers": {"min": 2, "max": 16, "idle_after": 5}}]},
                     "f.yaml").queues[0]
    assert (q.workers, q.autoscale, q.most_workers) == (2, config.Autoscale(2, 16, 5.0), 16)
    with pytest.raises(config.ConfigError, match="at most 256 workers in all"):
        config.parse({"queues": [{"name": f"q{i}", "handler": {"python": "m:f"},
                                  "workers": {"min": 1, "max": 200}} for i in range(2)]}, "f")
