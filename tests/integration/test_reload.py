"""HUP: reload the config without cutting tasks; refuse a bad one."""

from __future__ import annotations

import signal

from conftest import new_password, queue_config, rabbitmqctl, wait_for


def test_bad_config_on_reload_is_refused_and_old_pool_keeps_running(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=2)])
    pids = d.worker_pids()
    d.path.write_text("queues: [ {name: x, workers: many\n")
    d.send(signal.SIGHUP)
    wait_for(lambda: "reload refused" in d.log(), 10, what="reload refused")
    assert "YAML syntax error" in d.log()
    assert d.worker_pids() == pids and d.http("/readyz")[0] == 200
    mid = amqp.publish(qname, "sleep=0")
    wait_for(lambda: mid in d.ledger.ended_ids(), 10, what="old pool still works")


def test_reload_adds_and_removes_queues(daemon, amqp, qname):
    other = f"{qname}.b"
    d = daemon([queue_config(qname, workers=1)])
    d.config["queues"] = [queue_config(other, workers=2)]
    d.write_config()
    d.send(signal.SIGHUP)
    wait_for(lambda: d.metric("workqd_workers", queue=other, state="idle") == 2
             and len(d.worker_pids()) == 2, 15, what="new queue's pool up, old one gone")
    assert d.metric("workqd_workers", queue=qname) == 0
    mid = amqp.publish(other, "sleep=0")
    wait_for(lambda: mid in d.ledger.ended_ids(), 10, what="task on the added queue done")
    amqp.delete(other, f"{other}.dead", f"{other}.delay.1s")


def test_password_file_with_a_real_user_and_rotation(daemon, amqp, qname, tmp_path, broker_user):
    user, password = broker_user
    secret = tmp_path / "secret"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    d = daemon([queue_config(qname, workers=1)], start=False)
    d.config["broker"] = {"url": f"amqp://{user}@127.0.0.1:5672/%2F", "password_file": str(secret)}
    d.write_config()
    d.start()
    mid = amqp.publish(qname, "sleep=0")
    wait_for(lambda: mid in d.ledger.ended_ids(), 10, what="task done with the file's password")
    assert password not in d.log() and password not in d.path.read_text()
    # Rotate the secret: the broker's and the file's; then cut this user's connections.
    rotated = new_password()
    rabbitmqctl("change_password", user, rotated)
    secret.write_text(rotated + "\n")
    names = [line.rpartition("\t")[0] for line in rabbitmqctl("list_connections", "pid", "user")
             .splitlines() if line.rpartition("\t")[2] == user]
    assert names, "no connection of the test user"
    for name in names:
        rabbitmqctl("close_connection", name, "rotation test")
    wait_for(lambda: "reconnecting" in d.log(), 15, what="workers reconnect")
    mid = amqp.publish(qname, "sleep=0")
    wait_for(lambda: mid in d.ledger.ended_ids(), 20, what="task done after the rotation")
    assert d.proc.poll() is None and "refused the login" not in d.log()
    assert rotated not in d.log()
    assert d.stop() == 0
