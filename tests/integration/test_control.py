"""workqctl against a real daemon, a real broker and a real control socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import ROOT, queue_config, wait_for


def ctl(d, *args: str, python: str = sys.executable, prefix: tuple = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([*prefix, python, "-m", "workqd.ctl", "--socket", d.sock, *args],
                          capture_output=True, text=True, env=env, timeout=60)


def status(d, queue: str | None = None) -> dict:
    r = ctl(d, "status", *([queue] if queue else []), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def start(daemon, tmp_path, queues, sock_dir: Path | None = None, **top):
    sock = str((sock_dir or tmp_path) / "c.sock")
    d = daemon(queues, control={"socket": sock}, **top)
    d.sock = sock
    return d


def consumers(amqp, queue: str) -> int:
    return amqp.channel().queue_declare(queue, passive=True).method.consumer_count


def test_status_names_the_busy_workers_message_and_running_time(daemon, amqp, qname, tmp_path):
    d = start(daemon, tmp_path, [queue_config(qname, workers=2)])
    mid = amqp.publish(qname, "sleep=10")   # long enough to be seen busy on a loaded machine

    def busy():   # the JSON status and the table, both taken while it runs
        st = status(d, qname)
        for w in st["queues"][0]["workers"]:
            if w["state"] == "busy" and w["message_id"] == mid and w["running_for"] >= 1.0:
                return w, st, ctl(d, "status").stdout
    w, st, table = wait_for(busy, 30, interval=0.2, what="a worker busy with the message for 1s")
    assert w["pid"] in d.worker_pids() and w["rss"] > 1 << 20
    q = st["queues"][0]
    assert (q["name"], q["state"], q["size"], q["in_flight"]) == (qname, "running", 2, 1)
    assert mid in table and "busy" in table and qname in table
    wait_for(lambda: mid in d.ledger.ended_ids(), 30, what="the task done")
    wait_for(lambda: [x["tasks_done"] for x in status(d)["queues"][0]["workers"]
                      if x["pid"] == w["pid"]] == [1], 15, what="tasks_done 1")


def test_pause_cancels_consumers_running_task_finishes_and_resume_drains(daemon, amqp, qname,
                                                                         tmp_path):
    d = start(daemon, tmp_path, [queue_config(qname, workers=2, prefetch=1)])
    wait_for(lambda: consumers(amqp, qname) == 2, 15, what="2 consumers")
    running = amqp.publish(qname, "sleep=8")   # still running after the pause, under load too
    wait_for(lambda: any(e["id"] == running for e in d.ledger.events("start")), 15,
             what="the long task started")
    r = ctl(d, "pause", qname)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: consumers(amqp, qname) == 0, 5, interval=0.1,
             what="the broker's consumer count at 0")
    waiting = [amqp.publish(qname, f"n={i}") for i in range(4)]
    assert running not in d.ledger.ended_ids()   # still running while paused
    wait_for(lambda: running in d.ledger.ended_ids(), 30, what="the running task finished")
    wait_for(lambda: d.metric("workqd_tasks_processed_total", queue=qname,
                              outcome="success") == 1, 15, what="it settled")
    assert d.http("/readyz") == (503, f"queue {qname}: paused (workqctl resume)\n")
    assert d.metric("workqd_queue_paused", queue=qname) == 1
    assert status(d)["queues"][0]["state"] == "paused"
    # Acked, not requeued: the 4 new ones are all that is in the queue, none started.
    assert amqp.count(qname) == 4
    assert not {e["id"] for e in d.ledger.events("start")} & set(waiting)

    # A reload keeps the pause: the new workers connect but do not consume.
    old = set(d.worker_pids())
    d.send(signal.SIGHUP)
    wait_for(lambda: "reload complete" in d.log(), 30, what="reload complete")
    wait_for(lambda: not old & set(d.worker_pids()), 30, what="old workers gone")
    assert consumers(amqp, qname) == 0 and amqp.count(qname) == 4
    assert status(d)["queues"][0]["state"] == "paused"

    r = ctl(d, "resume", qname)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: d.ledger.ended_ids() >= set(waiting), 30, what="the waiting tasks done")
    wait_for(lambda: d.http("/readyz")[0] == 200, 15, what="ready again")
    assert d.metric("workqd_queue_paused", queue=qname) == 0
    assert not any(e["redelivered"] for e in d.ledger.events("start"))


def test_quiet_pauses_every_queue_and_resume_undoes_it(daemon, amqp, qname, tmp_path):
    other = qname + ".b"
    d = start(daemon, tmp_path, [queue_config(qname, workers=1), queue_config(other, workers=1)])
    try:
        assert ctl(d, "quiet").returncode == 0
        wait_for(lambda: consumers(amqp, qname) + consumers(amqp, other) == 0, 5, interval=0.1,
                 what="no consumer on either queue")
        assert {q["state"] for q in status(d)["queues"]} == {"paused"}
        assert ctl(d, "resume").returncode == 0
        wait_for(lambda: consumers(amqp, qname) == 1 and consumers(amqp, other) == 1, 10,
                 interval=0.1, what="both consuming again")
    finally:
        amqp.delete(other, other + ".dead")


def test_scale_up_and_down_under_load_loses_nothing(daemon, amqp, qname, tmp_path):
    d = start(daemon, tmp_path, [queue_config(qname, workers=2, prefetch=1)])
    ids = [amqp.publish(qname, f"n={i} sleep=0.3") for i in range(40)]
    assert ctl(d, "scale", qname, "5").returncode == 0
    wait_for(lambda: d.metric("workqd_workers", queue=qname, state="busy")
             + d.metric("workqd_workers", queue=qname, state="idle") == 5, 20,
             what="5 workers consuming")
    assert d.metric("workqd_pool_size", queue=qname) == 5
    wait_for(lambda: len(d.ledger.ended_ids()) >= 10, 60, what="10 tasks done")
    assert ctl(d, "scale", qname, "1").returncode == 0
    wait_for(lambda: len(d.worker_pids()) == 1, 30, what="1 worker left")
    assert d.metric("workqd_pool_size", queue=qname) == 1
    wait_for(lambda: d.ledger.ended_ids() >= set(ids), 120, what="every task done")
    starts = [e["id"] for e in d.ledger.events("start")]
    assert sorted(starts) == sorted(ids), "a task ran twice or was cut"
    wait_for(lambda: d.metric("workqd_tasks_processed_total", queue=qname,
                              outcome="success") == 40, 15, what="40 settled")
    q = status(d)["queues"][0]
    assert (q["size"], q["configured"], len(q["workers"])) == (1, 2, 1)
    # The config's size returns on reload.
    d.send(signal.SIGHUP)
    wait_for(lambda: status(d)["queues"][0]["size"] == 2 and len(d.worker_pids()) == 2, 30,
             what="back to the config's 2 workers")


def test_bad_requests_get_error_answers_and_the_master_keeps_serving(daemon, qname, tmp_path):
    d = start(daemon, tmp_path, [queue_config(qname, workers=1)])
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(d.sock)
        f = s.makefile("rwb")
        for line in (b"not json\n", b"[1,2]\n", b'{"v": 2, "cmd": "status"}\n',
                     b'{"v": 1}\n', b'{"v": 1, "cmd": "explode"}\n', b"\xff\xfe\n",
                     b'{"v": 1, "cmd": "scale", "queue": "' + qname.encode() +
                     b'", "workers": "many"}\n'):
            f.write(line)
            f.flush()
            answer = json.loads(f.readline())
            assert answer["v"] == 1 and answer["ok"] is False and answer["error"], answer
        f.write(b'{"v": 1, "cmd": "status"}\n')   # the same connection still works
        f.flush()
        assert json.loads(f.readline())["ok"] is True
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(d.sock)
        s.sendall(b"x" * 10000)
        answer = json.loads(s.makefile("rb").readline())
        assert answer["ok"] is False and "over 4096 bytes" in answer["error"]
    r = ctl(d, "pause", "no-such-queue")
    assert r.returncode == 1 and "no queue 'no-such-queue'" in r.stderr
    r = ctl(d, "scale", qname, "0")
    assert r.returncode == 1 and "from 1" in r.stderr
    assert d.proc.poll() is None and status(d)["queues"][0]["consuming"] == 1
    assert d.http("/readyz")[0] == 200


def test_exit_codes_without_a_daemon(tmp_path):
    class Nowhere:
        sock = str(tmp_path / "none.sock")
    r = ctl(Nowhere, "status")
    assert r.returncode == 3 and "no workqd listening" in r.stderr
    r = ctl(Nowhere, "scale")
    assert r.returncode == 2


def test_a_user_outside_the_sockets_group_is_refused(daemon, qname, tmp_path):
    # nobody must reach the socket's directory, so the socket's own mode decides.
    sock_dir = Path(tempfile.mkdtemp(prefix="workqctl-", dir="/tmp"))
    try:
        sock_dir.chmod(0o755)
        d = start(daemon, tmp_path, [queue_config(qname, workers=1)], sock_dir=sock_dir)
        assert oct(os.stat(d.sock).st_mode & 0o777) == "0o660"
        # The system python: the test venv's may live where nobody cannot read.
        r = ctl(d, "status", python="/usr/bin/python3",
                prefix=("setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"))
        assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and "permission denied" in r.stderr
        assert ctl(d, "status").returncode == 0   # root may
    finally:
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()


def test_dead_list_show_requeue_by_reason_and_purge(daemon, amqp, qname, tmp_path):
    d = start(daemon, tmp_path, [queue_config(qname, workers=1, max_body=200)])
    failed = [amqp.publish(qname, f"n={i} fail=1") for i in range(2)]
    big = amqp.publish(qname, "x" * 500)
    dead = f"{qname}.dead"
    wait_for(lambda: amqp.count(dead) == 3, 30, what="3 dead letters")
    assert d.stop() == 0   # dead letters are handled without the daemon

    def run(*args):
        return ctl(d, "-c", str(d.path), "dead", qname, *args)
    r = run("list", "--json")
    assert r.returncode == 0, r.stderr
    items = {i["id"]: i for i in json.loads(r.stdout)}
    assert {i: items[i]["reason"] for i in items} == {failed[0]: "failed", failed[1]: "failed",
                                                      big: "too-large"}
    table = run("list").stdout
    assert all(i in table for i in [*failed, big]) and "too-large" in table
    assert amqp.count(dead) == 3   # listing changed nothing
    r = run("show", failed[0])
    assert r.returncode == 0 and "header x-workq-reason: failed" in r.stdout
    assert "failed on purpose" in r.stdout and "n=0 fail=1" in r.stdout
    assert run("show", "nope").returncode == 1

    r = run("requeue", "--reason", "failed")
    assert r.returncode == 0, r.stderr
    assert "moved 2 task(s)" in r.stderr
    assert amqp.count(qname) == 2 and amqp.count(dead) == 1
    moved = amqp.get_all(qname)
    assert sorted(p.message_id for p, _ in moved) == sorted(failed)
    assert all("x-workq-reason" not in (p.headers or {}) for p, _ in moved)

    r = run("purge")
    assert r.returncode == 2 and "--yes" in r.stderr and amqp.count(dead) == 1
    r = run("purge", "--yes")
    assert r.returncode == 0 and "purged 1" in r.stderr and amqp.count(dead) == 0


def test_dead_requeue_by_id_moves_only_those(daemon, amqp, qname, tmp_path):
    d = start(daemon, tmp_path, [queue_config(qname, workers=1)])
    ids = [amqp.publish(qname, f"n={i} fail=1") for i in range(3)]
    wait_for(lambda: amqp.count(f"{qname}.dead") == 3, 30, what="3 dead letters")
    d.stop()
    r = ctl(d, "-c", str(d.path), "dead", qname, "requeue", "--id", ids[1])
    assert r.returncode == 0, (r.stderr, d.log())
    wait_for(lambda: amqp.count(f"{qname}.dead") == 2, 10, what="2 left in .dead")
    assert [p.message_id for p, _ in amqp.get_all(qname)] == [ids[1]]
    left = [p.message_id for p, _ in amqp.get_all(f"{qname}.dead")]
    assert sorted(left) == sorted([ids[0], ids[2]])


def test_autoscale_grows_to_max_under_a_burst_and_shrinks_to_min_when_idle(daemon, amqp,
                                                                           qname, tmp_path):
    d = start(daemon, tmp_path, [queue_config(
        qname, workers={"min": 1, "max": 4, "idle_after": 2}, prefetch=1)])
    assert (d.metric("workqd_pool_min_workers", queue=qname),
            d.metric("workqd_pool_max_workers", queue=qname)) == (1, 4)
    ids = [amqp.publish(qname, f"n={i} sleep=0.5") for i in range(40)]
    wait_for(lambda: d.metric("workqd_pool_size", queue=qname) == 4
             and d.metric("workqd_workers", queue=qname, state="busy") == 4, 60,
             what="the pool grown to 4 busy workers")
    assert len(d.worker_pids()) == 4
    wait_for(lambda: d.ledger.ended_ids() >= set(ids), 120, what="every task done")
    wait_for(lambda: d.metric("workqd_pool_size", queue=qname) == 1
             and len(d.worker_pids()) == 1, 60, what="the pool back at 1 worker")
    starts = [e["id"] for e in d.ledger.events("start")]
    assert sorted(starts) == sorted(ids), "a task ran twice or was cut"
    assert d.metric("workqd_tasks_processed_total", queue=qname, outcome="success") == 40
    q = status(d)["queues"][0]
    assert (q["size"], q["min"], q["max"]) == (1, 1, 4)


def test_queue_wait_histogram_from_submit_stamp_and_timestamp(daemon, amqp, qname, tmp_path):
    import time
    import uuid

    import rawamqp
    from conftest import BROKER_URL
    from workqd.msgid import new_message_ids
    d = start(daemon, tmp_path, [queue_config(qname, workers=1, retry={"attempts": 2,
                                                                        "backoff": [1]})])
    assert ctl(d, "pause", qname).returncode == 0
    wait_for(lambda: consumers(amqp, qname) == 0, 5, interval=0.1, what="paused")
    r = subprocess.run([sys.executable, "-m", "workqd.submit", "--url", BROKER_URL, "-q", qname,
                        "n=1"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr   # test_submit checks the time its id carries
    amqp.publish(qname, "n=2", timestamp=int(time.time()) - 20)   # another producer, 20 s ago
    amqp.publish(qname, "n=3 fail=1")                              # no time: not counted
    # Other producers' version 7 ids, written byte for byte without pika: one made 30 s
    # ago counts; one dated a year ahead, or made of the right digits in the wrong places,
    # is no time at all.
    now_ms = int(time.time() * 1000)
    odd = [new_message_ids(1, now_ms + 365 * 86_400_000)[0],
           "0193f0a1b2c37" + "zzz" + "8" + "0" * 15]
    with rawamqp.Publisher() as raw:
        raw.publish(qname, b"n=4", rawamqp.properties(
            message_id=str(uuid.UUID(new_message_ids(1, now_ms - 30_000)[0]))))
        for i, mid in enumerate(odd):
            raw.publish(qname, f"n={5 + i}".encode(), rawamqp.properties(message_id=mid))
    assert ctl(d, "resume", qname).returncode == 0
    wait_for(lambda: d.metric("workqd_tasks_processed_total", queue=qname) == 7, 60,
             what=lambda: f"6 tasks settled, the failing one twice; log:\n{d.log()[-3000:]}")
    m = d.metrics()
    q = f'queue="{qname}"'
    assert m[f"workqd_task_queue_wait_seconds_count{{{q}}}"] == 3   # not the retry's second try
    assert m[f'workqd_task_queue_wait_seconds_bucket{{le="10.0",{q}}}'] == 1
    assert 50 <= m[f"workqd_task_queue_wait_seconds_sum{{{q}}}"] < 150



def test_metrics_negotiates_openmetrics_and_gzip(daemon, qname, tmp_path):
    import gzip
    import urllib.request
    d = start(daemon, tmp_path, [queue_config(qname, workers=1)])
    url = f"http://127.0.0.1:{d.port}/metrics"
    req = urllib.request.Request(url, headers={
        "Accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5",
        "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert r.headers["Content-Encoding"] == "gzip"
        text = gzip.decompress(r.read()).decode()
    assert text.endswith("# EOF\n") and f'workqd_queue_paused{{queue="{qname}"}} 0' in text
    with urllib.request.urlopen(url, timeout=10) as r:   # a plain client: plain text
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert r.headers.get("Content-Encoding") is None
        assert "# EOF" not in r.read().decode()


def test_status_line_says_paused(daemon, qname, tmp_path):
    notify = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify)
    sock.settimeout(0.2)
    sock_path = str(tmp_path / "c.sock")
    d = daemon([queue_config(qname, workers=1)], start=False, control={"socket": sock_path})
    d.sock = sock_path
    env = d.env()
    d.env = lambda: {**env, "NOTIFY_SOCKET": notify}
    d.start()
    assert ctl(d, "pause", qname).returncode == 0
    seen = []

    def paused_status():
        try:
            seen.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
        return any("STATUS=" in m and f"paused: {qname}" in m for m in seen)
    wait_for(paused_status, 20, interval=0, what=f"STATUS= saying paused; got {seen[-3:]}")
    sock.close()
