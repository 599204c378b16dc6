"""The master as a process: single-threaded when it forks, deaf to stray signals."""

from __future__ import annotations

import os
import signal
import time

from conftest import queue_config, wait_for


def test_master_forks_only_while_single_threaded(daemon, amqp, qname, tmp_path, monkeypatch):
    forks = tmp_path / "forks"
    monkeypatch.setenv("WORKQ_FORK_LOG", str(forks))
    d = daemon([queue_config(qname, workers=2)], start=False)
    d.start(module="forkcheck")
    # Forks after HTTP clients, the poller and a reload have all been active.
    for _ in range(5):
        assert d.http("/metrics")[0] == 200
    # /readyz is 200 once one worker consumes: wait for both to say so, or the victim
    # might die before its line, and the count below never reach 3.
    wait_for(lambda: d.log().count("consuming from") == 2, 15,
             what=lambda: f"both workers consuming; log:\n{d.log()}")
    victim = d.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    # The master's own word that it saw the death and replaced the worker: the
    # process table alone can show two live workers before the replacement exists.
    wait_for(lambda: f"(pid {victim}) killed by SIGKILL" in d.log()
             and d.log().count("consuming from") == 3
             and len(d.worker_pids()) == 2, 15,
             what=lambda: f"replacement worker consuming; log:\n{d.log()}")
    d.send(signal.SIGHUP)
    wait_for(lambda: "reload complete" in d.log(), 20, what="reload complete")
    mid = amqp.publish(qname, "sleep=0")
    wait_for(lambda: mid in d.ledger.ended_ids(), 15, what="a task after the reload")

    def fork_records():
        return [line.split() for line in forks.read_text().splitlines()]
    # 2 workers + the poller at start, 1 replacement, 2 workers and a poller on reload.
    wait_for(lambda: len(fork_records()) >= 6, 15, what="six forks of the master")
    assert d.stop() == 0
    records = fork_records()
    assert {threads for _, threads in records} == {"1"}, records
    assert "Traceback" not in d.log()


def test_stray_signals_are_ignored_by_the_master(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1)])
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGRTMIN + 3):
        d.send(sig)
    wait_for(lambda: d.log().count("ignored (workqd acts on") == 4, 10,
             what="four signals logged as ignored")
    assert d.proc.poll() is None and d.http("/readyz")[0] == 200
    mid = amqp.publish(qname, "sleep=0")
    wait_for(lambda: mid in d.ledger.ended_ids(), 10, what="the daemon still works")
    assert d.stop() == 0


def test_term_drain_keeps_systemd_informed(daemon, amqp, qname, tmp_path):
    """While draining, the master asks systemd for more time (EXTEND_TIMEOUT_USEC)."""
    import socket
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.2)
    d = daemon([queue_config(qname, workers=1)], start=False, shutdown_timeout=20)
    env = d.env()
    d.env = lambda: {**env, "NOTIFY_SOCKET": sock_path}
    d.start()
    mid = amqp.publish(qname, "sleep=6")
    wait_for(lambda: d.ledger.events("start"), 10, what="task started")
    d.send(signal.SIGTERM)
    messages = []
    deadline = time.monotonic() + 20
    while d.proc.poll() is None and time.monotonic() < deadline:
        try:
            messages.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
    assert d.proc.wait(10) == 0
    assert mid in d.ledger.ended_ids()   # the drain let the task finish
    extends = [m for m in messages if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert any("STOPPING=1" in m for m in messages) and len(extends) >= 1, messages
    sock.close()
