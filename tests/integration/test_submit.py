"""workq-submit against the real broker: confirms, exit codes, files, --wait, bad
arguments, credentials, several nodes, a node lost mid-batch, a broker under alarm."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import BROKER_URL, Amqp, free_port, machine_lock, queue_config, wait_for

from workqd import config
from workqd.broker import queue_arguments

def submit(*args, stdin: bytes | None = None, timeout: float = 60, env: dict | None = None
           ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workqd.submit", *args], input=stdin,
                          capture_output=True, timeout=timeout, env=env)


def test_words_become_one_persistent_confirmed_task(amqp, qname):
    amqp.declare(qname, "classic")
    r = submit("--url", BROKER_URL, "-q", qname, "--header", "team=ops", "--priority", "3",
               "--message-id", "m-1", "hello", "world...")
    assert r.returncode == 0, r.stderr
    (props, body), = amqp.get_all(qname)
    assert body == b"hello world..."
    assert props.delivery_mode == 2 and props.message_id == "m-1"
    stamp = props.headers.pop("x-workq-submitted-ms")   # for workqd_task_queue_wait_seconds
    assert abs(stamp / 1000 - time.time()) < 60
    assert props.headers == {"team": "ops"} and props.priority == 3


def test_a_task_without_a_chosen_id_carries_its_publish_time_in_the_id(amqp, qname):
    amqp.declare(qname, "classic")
    before = time.time()
    r = submit("--url", BROKER_URL, "-q", qname, "--header", "team=ops", "hello")
    assert r.returncode == 0, r.stderr
    (props, body), = amqp.get_all(qname)
    # A version 7 UUID made as the task was published: no header needed for the time.
    u = uuid.UUID(props.message_id)
    assert (u.version, u.hex) == (7, props.message_id)
    assert before - 0.01 <= (u.int >> 80) / 1000 <= time.time() + 0.01
    assert props.headers == {"team": "ops"} and body == b"hello"


def test_unroutable_queue_exits_1_and_names_the_task():
    r = submit("--url", BROKER_URL, "-q", "no.such.queue.anywhere", "--message-id", "lost-1", "x")
    assert r.returncode == 1
    assert b"task lost-1 not accepted: unroutable" in r.stderr


def test_broker_down_exits_3():
    port = free_port()
    r = submit("--url", f"amqp://guest:guest@127.0.0.1:{port}/", "x")
    assert r.returncode == 3
    assert r.stderr.decode().splitlines() == [
        f"workq-submit: cannot connect to amqp://guest:***@127.0.0.1:{port}/: connection refused"]


# --- bad arguments: exit 2, one line, no traceback, fast -------------------

FIFO = "@fifo"          # replaced by a FIFO that nobody ever writes to
DIR = "@dir"
MISSING_CA = "@missing-ca-config"
BIG_LINE = "@big-line"
GARBAGE_CA = "@garbage-ca-config"
TWO_LINE_PW = "@two-line-password"
EMPTY_PW = "@empty-password"


@pytest.fixture(scope="module")
def odd_files():
    base = Path(tempfile.mkdtemp(prefix="wq_submit_"))
    os.mkfifo(base / "fifo")
    (base / "dir").mkdir()
    (base / "missing-ca.yaml").write_text(yaml.safe_dump({
        "broker": {"url": "amqps://127.0.0.1:5671/%2F",
                   "tls": {"ca_file": str(base / "no-such-ca.pem")}},
        "queues": [queue_config("tasks")]}))
    (base / "garbage-ca.pem").write_text("not a certificate\n")
    (base / "garbage-ca.yaml").write_text(yaml.safe_dump({
        "broker": {"url": "amqps://127.0.0.1:5671/%2F",
                   "tls": {"ca_file": str(base / "garbage-ca.pem")}},
        "queues": [queue_config("tasks")]}))
    (base / "two-line-password").write_text("s3cret\nsomething else\n")
    (base / "empty-password").write_text(" \n")
    with open(base / "big-line", "wb") as f:
        f.write(b"ok\n" + b"x" * (16 * 1024 * 1024 + 1) + b"\n")
    yield {FIFO: str(base / "fifo"), DIR: str(base / "dir"),
           MISSING_CA: str(base / "missing-ca.yaml"), BIG_LINE: str(base / "big-line"),
           GARBAGE_CA: str(base / "garbage-ca.yaml"),
           TWO_LINE_PW: str(base / "two-line-password"), EMPTY_PW: str(base / "empty-password")}
    shutil.rmtree(base)


BAD_ARGUMENTS = [
    (["--url", "amqp://[::1", "x"], "Invalid IPv6 URL"),
    (["--url", "amqp://bob:s3cret@[::1", "x"], "bob:***@"),
    (["--url", "", "x"], "empty URL"),
    (["--url", BROKER_URL, "--url", "", "x"], "empty URL"),
    (["--url", "amqp://h:99999", "x"], "Port out of range"),
    (["--url", "amqp://h:0/", "x"], "port 0"),
    (["--url", "http://nope", "x"], "amqp://"),
    (["--url", "amqp:///%2F", "x"], "no host"),
    (["--url", "amqp://h/?heartbeat=abc", "x"], "heartbeat"),
    (["--url", "amqp://h/?nosuch=1", "x"], "Unknown URL parameter"),
    (["--url", "amqp://bob@127.0.0.1/", "x"], "no password"),
    (["--wait", "--timeout", "-5", "x"], "--timeout -5"),
    (["--wait", "--timeout", "0", "x"], "--timeout 0"),
    (["--wait", "--timeout", "nan", "x"], "--timeout nan"),
    (["--wait", "--timeout", "inf", "x"], "--timeout inf"),
    (["--wait", "--timeout", "abc", "x"], "invalid float"),
    (["--timeout", "3", "x"], "only makes sense with --wait"),
    (["--confirm-timeout", "nan", "x"], "--confirm-timeout nan"),
    (["--confirm-timeout", "-1", "x"], "--confirm-timeout -1"),
    (["--priority", "300", "x"], "0-255"),
    (["--priority", "-1", "x"], "0-255"),
    (["--priority", "999", "x"], "0-255"),
    (["--priority", "high", "x"], "invalid int"),
    (["--header", "novalue", "x"], "KEY=VALUE"),
    (["--header", "=v", "x"], "KEY=VALUE"),
    (["--header", "k" * 256 + "=v", "x"], "longer than 255"),
    (["--header", "k=a\nb", "x"], "control character"),
    (["--message-id", "i" * 256, "x"], "longer than 255"),
    (["--message-id", "", "x"], "empty id"),
    (["--message-id", "a", "--file", "-"], "exactly one task"),
    (["-q", "", "x"], "empty queue name"),
    (["-q", "q" * 256, "x"], "longer than 255"),
    (["--file", "/dev/zero"], "character device"),
    (["--file", DIR], "directory"),
    (["--file", FIFO], "FIFO"),
    (["--file", "/nonexistent/tasks.txt"], "No such file"),
    (["--file", BIG_LINE], "line 2 is longer than 16 MiB"),
    (["--file", "-", "words"], "not both"),
    (["--password-file", FIFO, "x"], "FIFO"),
    (["--password-file", "/nonexistent/pw", "x"], "No such file"),
    # The daemon's checks (config.read_password): the secret itself is never shown.
    (["--password-file", TWO_LINE_PW, "x"], "more than one line"),
    (["--password-file", EMPTY_PW, "x"], "is empty"),
    (["-c", FIFO, "x"], "FIFO"),
    (["-c", "/dev/zero", "x"], "character device"),
    (["--requeue-dead", "q", "--url", "amqp://h:99999"], "Port out of range"),
    (["--requeue-dead", "q", "--url", "amqps://127.0.0.1/", "-c", MISSING_CA], "ca_file"),
    (["--url", "amqps://127.0.0.1/", "-c", MISSING_CA, "x"], "ca_file"),
    (["-c", MISSING_CA, "x"], "ca_file"),
    (["-c", GARBAGE_CA, "x"], "holds no usable CA certificate"),   # found by the config check
    (["--requeue-dead", "q", "x"], "takes no tasks"),
    (["--requeue-dead", ""], "empty queue name"),
    ([""], "empty task"),
    (["  ", " "], "empty task"),
    (["--no-such-flag"], "unrecognized arguments"),
]


@pytest.mark.parametrize("args,says", BAD_ARGUMENTS,
                         ids=[" ".join(a)[:60] for a, _ in BAD_ARGUMENTS])
def test_bad_argument_exits_2_with_one_line(odd_files, args, says):
    args = [odd_files.get(a, a) for a in args]
    # A FIFO opened or a broker waited for would hang: subprocess's timeout fails the test.
    r = submit(*args, stdin=b"a\nb\n", timeout=30)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2, (args, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert says in err, err
    assert "s3cret" not in err


def test_stdin_without_end_is_refused_at_the_line_cap():
    with open("/dev/zero", "rb") as zero:
        r = subprocess.run([sys.executable, "-m", "workqd.submit", "-"], stdin=zero,
                           capture_output=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.decode().splitlines() == [
        "workq-submit: standard input: a line longer than 16 MiB"]


def test_tls_handshake_failure_exits_3_with_one_line():
    # The plain AMQP port does not speak TLS: the handshake fails.
    r = submit("--url", "amqps://guest:guest@127.0.0.1:5672/%2F", "x", timeout=30)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and "TLS handshake failed" in lines[0], lines


# --- credentials ---------------------------------------------------------

def test_password_file_and_environment_keep_the_password_off_the_command_line(
        broker_user, amqp, qname, tmp_path):
    user, password = broker_user
    amqp.declare(qname, "classic")
    url = f"amqp://{user}@127.0.0.1:5672/%2F"
    pw = tmp_path / "pw"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    r = submit("--url", url, "--password-file", str(pw), "-q", qname, "--message-id", "pf-1",
               "from the file")
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in os.environ.items()}
    env["WORKQ_PASSWORD"] = password
    r = submit("--url", url, "-q", qname, "--message-id", "env-1", "from the env", env=env)
    assert r.returncode == 0, r.stderr
    got = {props.message_id: body for props, body in amqp.get_all(qname)}
    assert got == {"pf-1": b"from the file", "env-1": b"from the env"}

    pw.write_text("not-" + password)
    r = submit("--url", url, "--password-file", str(pw), "-q", qname, "x")
    assert r.returncode == 3
    err = r.stderr.decode()
    assert len(err.splitlines()) == 1 and "login refused" in err, err
    assert password not in err


def test_password_file_overrides_the_configs(broker_user, amqp, qname, tmp_path):
    user, password = broker_user
    amqp.declare(qname, "classic")
    wrong, right = tmp_path / "wrong", tmp_path / "right"
    wrong.write_text("wrong")
    right.write_text(password)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "broker": {"url": f"amqp://{user}@127.0.0.1:5672/%2F", "password_file": str(wrong)},
        "queues": [queue_config(qname, type="classic")]}))
    r = submit("-c", str(cfg), "x")
    assert r.returncode == 3 and b"login refused" in r.stderr
    r = submit("-c", str(cfg), "--password-file", str(right), "y")
    assert r.returncode == 0, r.stderr
    assert [body for _, body in amqp.get_all(qname)] == [b"y"]


# --- several nodes -------------------------------------------------------

def test_first_url_refused_then_the_next_node_takes_the_tasks(amqp, qname):
    amqp.declare(qname, "classic")
    r = submit("--url", "amqp://guest:guest@127.0.0.1:1/%2F", "--url", BROKER_URL,
               "-q", qname, "--message-id", "fo-1", "x")
    assert r.returncode == 0, r.stderr
    assert [p.message_id for p, _ in amqp.get_all(qname)] == ["fo-1"]


def test_every_node_refused_exits_3_naming_each():
    ports = [free_port(), free_port()]
    r = submit(*[a for p in ports for a in ("--url", f"amqp://127.0.0.1:{p}/")], "x")
    assert r.returncode == 3
    err = r.stderr.decode()
    assert len(err.splitlines()) == 1, err
    assert all(f"127.0.0.1:{p}/: connection refused" in err for p in ports), err


def test_config_urls_are_tried_in_order(amqp, qname, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "broker": {"urls": [f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F", BROKER_URL]},
        "queues": [queue_config(qname, type="classic")]}))
    r = submit("-c", str(cfg), "x")
    assert r.returncode == 0, r.stderr
    assert amqp.count(qname) == 1


# --- files, stdin, config, --wait (as before) -----------------------------

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
    daemon_args = queue_arguments(config.load(str(cfg)).queues[0])
    args = amqp.channel().queue_declare(qname, durable=True, arguments=daemon_args)
    assert args.method.message_count == 2  # the daemon's arguments: redeclaring is accepted


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
    d = daemon([queue_config(qname, workers=1)])
    waiter = subprocess.Popen([sys.executable, "-m", "workqd.submit", "--url", BROKER_URL,
                               "-q", qname, "--wait", "--timeout", "20", "--message-id", "s-1",
                               "sleep=1.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: d.ledger.events("start"), 10, what="task running")
    assert d.stop(signal.SIGTERM) == 0
    out, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 0, err
    assert out.decode().startswith("s-1 success")


# --- a throwaway node: lost mid-batch, memory alarm -------------------------
# Recipe: /work/shared/CLUSTER-TESTS.md (upstream scripts, own HOME and cookie,
# loopback only). Ports 5691/25691 are this file's, apart from other suites'.

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
NODE_PORT, NODE_DIST_PORT = 5691, 25691
NODE_NAME = "wqsubmit@localhost"
KERNEL_ARGS = "-kernel inet_dist_use_interface {127,0,0,1} -kernel net_ticktime 10"


class LoneNode:
    """One RabbitMQ node beside the machine's broker, for tests that hurt it."""

    def __init__(self):
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            pytest.fail(f"{RABBIT_BIN}/rabbitmq-server is missing: install rabbitmq-server")
        self.base = Path(tempfile.mkdtemp(prefix="wqsubmit."))
        home = self.base / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        d = self.base / "node"
        (d / "mnesia").mkdir(parents=True)
        (d / "log").mkdir()
        (d / "rabbitmq.conf").write_text("loopback_users = none\n")
        (d / "advanced.config").write_text("[].\n")
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq-env.conf").write_text("")
        self.pidfile = d / "mnesia" / f"{NODE_NAME}.pid"
        self.env = {
            "PATH": os.environ["PATH"], "HOME": str(home), "RABBITMQ_NODENAME": NODE_NAME,
            "RABBITMQ_USE_LONGNAME": "false", "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(NODE_PORT), "RABBITMQ_DIST_PORT": str(NODE_DIST_PORT),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"), "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": KERNEL_ARGS,
            "RABBITMQ_CTL_ERL_ARGS": KERNEL_ARGS,
        }
        self.url = f"amqp://guest:guest@127.0.0.1:{NODE_PORT}/%2F"

    def ctl(self, *args: str, timeout: float = 120, check: bool = True):
        return subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", NODE_NAME, *args],
                              env=self.env, capture_output=True, timeout=timeout, check=check)

    def start(self) -> None:
        if self.pidfile.exists():
            self.pidfile.unlink()  # left behind by kill -9
        subprocess.run([str(RABBIT_BIN / "rabbitmq-server"), "-detached"], env=self.env,
                       check=True, capture_output=True, timeout=60)
        self.ctl("wait", str(self.pidfile), "--timeout", "120", timeout=150)
        self.ctl("await_startup", timeout=150)

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        pid = self.pid()
        assert pid, "node not running"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: self.pid() is None, 30, what="node dead")

    def stop(self) -> None:
        if self.pid():
            self.ctl("shutdown", timeout=120, check=False)
        pid = self.pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def lone_node():
    # Its port and node name are fixed: one lone node on the machine at a time, whichever
    # pytest process asks (the two runs of tests/run.sh overlap).
    with machine_lock("lone-node", True, 900, "another test run kept the lone node"):
        node = LoneNode()
        try:
            node.start()
            yield node
        finally:
            node.stop()


def _drain(url: str, queue: str) -> list[bytes]:
    """Every body in ``queue``, consumed with a large prefetch (basic_get is one round trip
    per message), then the queue is deleted."""
    c = Amqp(url)
    ch = c.channel()
    ch.basic_qos(prefetch_count=2000)
    expected = c.count(queue)
    bodies = []
    for method, _props, body in ch.consume(queue, auto_ack=True, inactivity_timeout=2):
        if method is None:
            break
        bodies.append(body)
        if len(bodies) >= expected:
            break
    ch.cancel()
    c.delete(queue)
    c.close()
    return bodies


def _file_of(tmp_path: Path, n: int, size: int) -> Path:
    path = tmp_path / "tasks.txt"
    pad = "p" * size
    path.write_text("".join(f"task {i} {pad}\n" for i in range(n)))
    return path


def _submit_20000_and_kill_the_node(lone_node, q: str, tmp_path: Path,
                                    *more_urls: str) -> tuple[int, str]:
    """workq-submit --file of 20,000 tasks to ``q`` on the lone node (then ``more_urls``);
    the node is killed once 500 are stored. Returns submit's exit status and stderr."""
    c = Amqp(lone_node.url)
    c.declare(q, "classic")
    c.close()
    # The queue's declaration must be on disk before the kill (mnesia logs it lazily).
    lone_node.ctl("eval", "mnesia:dump_log().")
    tasks = _file_of(tmp_path, 20_000, 2000)
    urls = [a for url in (lone_node.url, *more_urls) for a in ("--url", url)]
    proc = subprocess.Popen([sys.executable, "-m", "workqd.submit", *urls, "-q", q,
                             "--file", str(tasks)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        watch = Amqp(lone_node.url)
        wait_for(lambda: watch.count(q) >= 500, 60, interval=0.02, what="first tasks stored")
        lone_node.kill()
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err.decode()


def test_node_killed_mid_batch_names_every_unconfirmed_task(lone_node, tmp_path):
    q = f"wq.submit.kill.{uuid.uuid4().hex[:6]}"
    returncode, err = _submit_20000_and_kill_the_node(lone_node, q, tmp_path)
    assert returncode in (1, 3), err
    assert "Traceback" not in err
    # A task published before the loss is named by its id and line; one never published
    # has no id yet, and is named by its line alone.
    named = {int(a or b) for a, b in re.findall(
        r"^workq-submit: task (?:\w+ \(line (\d+)\)|line (\d+)) not confirmed$", err, re.M)}
    confirmed = int(re.search(r"(\d+) of 20000 task\(s\) confirmed", err).group(1))
    assert confirmed + len(named) == 20_000, err[-2000:]
    assert (returncode == 1) == (confirmed > 0)
    # What the broker stored (confirmed ones are on disk) plus what was named is everything.
    lone_node.start()
    stored = {int(body.split()[1]) + 1 for body in _drain(lone_node.url, q)}
    assert stored | named == set(range(1, 20_001))
    assert len(stored) >= confirmed


def test_node_killed_mid_batch_fails_over_to_the_next_node(lone_node, amqp, qname, tmp_path):
    amqp.declare(qname, "classic")
    returncode, err = _submit_20000_and_kill_the_node(lone_node, qname, tmp_path, BROKER_URL)
    assert returncode == 0, err
    assert "lost: connection reset; publishing" in err and "may arrive twice" in err, err
    on_main = {int(body.split()[1]) for body in _drain(BROKER_URL, qname)}
    lone_node.start()
    on_lost_node = {int(body.split()[1]) for body in _drain(lone_node.url, qname)}
    assert on_main | on_lost_node == set(range(20_000))


def _confirm_sent(node) -> bool:
    """Every channel in confirm mode on ``node`` has nothing left unconfirmed."""
    rows = [line.split() for line in
            node.ctl("-q", "list_channels", "confirm", "messages_unconfirmed").stdout
            .decode().splitlines() if line.strip()]
    return bool(rows) and all(r == ["true", "0"] for r in rows if r[0] == "true")


def test_wait_names_a_confirmed_task_whose_outcome_went_with_the_node(lone_node, tmp_path):
    q = f"wq.submit.wait.{uuid.uuid4().hex[:6]}"
    c = Amqp(lone_node.url)
    c.declare(q, "classic")  # no worker: the outcome never comes from this node
    proc = subprocess.Popen([sys.executable, "-m", "workqd.submit", "--url", lone_node.url,
                             "-q", q, "--wait", "--timeout", "60", "--message-id", "w-1", "x"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: c.count(q) == 1, 30, what="task stored")
        c.close()
        # Stored is not yet confirmed: on a loaded machine the confirm can still be on its
        # way when the node dies, and then the task is (rightly) "not confirmed".
        wait_for(lambda: _confirm_sent(lone_node), 30, what="the broker's confirm sent")
        lone_node.kill()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if lone_node.pid() is None:
            lone_node.start()
    err = err.decode()
    assert proc.returncode == 4, err
    assert "task w-1 confirmed, but its outcome was lost with the connection" in err, err
    assert "Traceback" not in err


def test_blocked_broker_is_reported_and_bounded(lone_node, tmp_path):
    q = f"wq.submit.alarm.{uuid.uuid4().hex[:6]}"
    c = Amqp(lone_node.url)
    c.declare(q, "classic")
    lone_node.ctl("set_vm_memory_high_watermark", "0.0000001")
    try:
        wait_for(lambda: b"memory" in lone_node.ctl("eval", "rabbit_alarm:get_alarms().").stdout,
                 30, interval=0.5, what="memory alarm raised")
        started = time.monotonic()
        r = submit("--url", lone_node.url, "-q", q, "--confirm-timeout", "5",
                   "--file", str(_file_of(tmp_path, 100, 10)), timeout=60)
        elapsed = time.monotonic() - started
        err = r.stderr.decode()
        assert r.returncode == 3, err  # nothing could be published
        assert "blocking publishers" in err and "Traceback" not in err, err
        # Sent into the blocked connection, so each is named: it may still arrive.
        assert "0 of 100 task(s) confirmed" in err, err
        assert len(re.findall(r"^workq-submit: task \w+ \(line \d+\) not confirmed$", err,
                              re.M)) == 100, err
        assert elapsed < 30, f"took {elapsed:.1f}s"
    finally:
        lone_node.ctl("set_vm_memory_high_watermark", "0.4")
        c.close()
    wait_for(lambda: b"memory" not in lone_node.ctl("eval", "rabbit_alarm:get_alarms().").stdout,
             30, interval=0.5, what="memory alarm cleared")
    r = submit("--url", lone_node.url, "-q", q, "after the alarm")
    assert r.returncode == 0, r.stderr
    c = Amqp(lone_node.url)
    assert c.count(q) >= 1
    c.delete(q)
    c.close()


def test_blocked_after_some_confirms_is_exit_1_naming_the_rest(capsys):
    # Pure logic of the verdict (the broker part is test_blocked_broker_is_reported_and_bounded):
    # an alarm that set in after the first confirm.
    from workqd.client import UNREACHABLE, Batch, Outgoing
    from workqd.submit import exit_status
    batch = Batch([], "q", [Outgoing("a", b"1", 1), Outgoing("b", b"2", 2)], confirm_timeout=30)
    batch.next = batch.published = 2
    batch.confirmed = {0}
    batch.error = (UNREACHABLE, "gave up after 30s: the broker at amqp://h is still blocking "
                   "publishers")
    assert exit_status(batch) == 1
    err = capsys.readouterr().err
    assert "task b (line 2) not confirmed" in err and "task a" not in err
    assert "1 of 2 task(s) confirmed" in err and "blocking publishers" in err


@pytest.mark.parametrize("command, module", [("workqd", "workqd.cli"),
                                             ("workq-submit", "workqd.submit"),
                                             ("workqctl", "workqd.ctl")])
def test_help_of_every_command(command, module):
    # As a new user types it: the console script next to this interpreter (CI's venvs
    # install the package); the trixie suite runs the source tree, without scripts.
    script = Path(sys.executable).parent / command
    argv = [str(script)] if script.exists() else [sys.executable, "-m", module]
    r = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert r.stdout.startswith("usage: ") and "--config" in r.stdout
