"""Config validation: pure logic, plus the command line's one-line errors and exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import queue_config, wait_for
from workqd import config, webauth

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"queues": [{"name": "tasks", "handler": {"python": "workqd.handlers:sleep_dots"}}]}


def problems(data) -> list[str]:
    with pytest.raises(config.ConfigError) as e:
        config.parse(data, "workqd.yaml")
    return e.value.problems


def test_shipped_default_config_is_valid_and_matches_the_design():
    cfg = config.load(str(ROOT / "etc/workqd/workqd.yaml"))
    q = cfg.queue("tasks")
    assert (q.type, q.workers, q.prefetch, q.handler.python) == (
        "quorum", 4, 1, "workqd.handlers:sleep_dots")
    assert cfg.metrics_listen == ("127.0.0.1", 9464)
    assert cfg.broker.urls == ("amqp://guest:guest@localhost:5672/%2F",)
    assert q.retry.attempts == 3 and q.retry.backoff == (5.0, 30.0)
    assert cfg.warnings == ()


def test_minimal_config_gets_defaults():
    cfg = config.parse(GOOD, "x.yaml")
    q = cfg.queues[0]
    assert (q.type, q.workers, q.prefetch, q.timeout, q.max_redeliveries) == (
        "quorum", 4, 1, 600.0, 3)
    assert cfg.shutdown_timeout == 30.0 and cfg.broker.heartbeat == 30


def test_wrong_type_names_file_and_key_path():
    data = {"queues": [{"name": "tasks", "workers": "four",
                        "handler": {"python": "a:b"}}]}
    assert problems(data) == [
        'workqd.yaml: queues[0].workers: must be a whole number >= 1, got "four"']


def test_every_problem_is_reported_once():
    data = {"bogus": 1, "broker": {"url": "http://x", "heartbeat": -1},
            "metrics": {"listen": "nowhere"},
            "queues": [{"name": "q", "type": "stream", "prefetch": 1.5,
                        "handler": {"python": "a:b", "command": ["/bin/true"]},
                        "retry": {"attempts": 0, "backoff": ["x"]}, "colour": "red"}]}
    got = problems(data)
    keys = [line.split(": ")[1] for line in got]
    assert keys == ["bogus", "broker.url", "broker.heartbeat", "metrics.listen",
                    "queues[0].colour", "queues[0].handler", "queues[0].type",
                    "queues[0].prefetch", "queues[0].retry.attempts",
                    "queues[0].retry.backoff"], got
    assert all(line.startswith("workqd.yaml: ") for line in got)


def test_duplicate_queue_names_and_missing_handler():
    data = {"queues": [{"name": "a", "handler": {"python": "m:f"}}, {"name": "a"}]}
    assert problems(data) == ["workqd.yaml: queues[1].handler: is required",
                              'workqd.yaml: queues[1].name: "a" is already used by queues[0]']


def test_command_must_be_absolute_argv():
    data = {"queues": [{"name": "a", "handler": {"command": "convert x"}}]}
    assert "must be a non-empty list of strings" in problems(data)[0]
    data = {"queues": [{"name": "a", "handler": {"command": ["convert"]}}]}
    assert "absolute path" in problems(data)[0]


def test_sizes_and_backoff():
    data = {"queues": [{"name": "a", "handler": {"python": "m:f"},
                        "max_memory_per_worker": "512MiB", "retry": {"attempts": 5,
                                                                    "backoff": [1, 2]}}]}
    q = config.parse(data, "x").queues[0]
    assert q.max_memory_per_worker == 512 << 20
    # A backoff list shorter than the attempts repeats its last value.
    assert [q.retry.delay_before(a) for a in (2, 3, 4, 5)] == [1, 2, 2, 2]


def test_exponential_backoff_doubles_up_to_max_with_jitter_steps():
    def retry(backoff, attempts=6):
        data = {"queues": [{"name": "a", "handler": {"python": "m:f"},
                            "retry": {"attempts": attempts, "backoff": backoff}}]}
        return config.parse(data, "x").queues[0].retry
    plain = retry({"initial": 5, "max": 30, "jitter": 0})
    assert [plain.delay_before(a) for a in range(2, 7)] == [5, 10, 20, 30, 30]
    assert plain.delays() == [5, 10, 20, 30]
    r = retry({"initial": 8, "max": 16})   # default jitter 0.5: 4 steps in [d/2, d]
    assert [r.delay_before(2, pick) for pick in (0, 0.3, 0.6, 0.99)] == [4, 5.3, 6.7, 8]
    assert [r.delay_before(6, pick) for pick in (0, 0.99)] == [8, 16]
    assert r.delays() == [4, 5.3, 6.7, 8, 11, 13, 16]
    assert {r.delay_before(3) for _ in range(200)} == {8, 11, 13, 16}
    # Only the delays the attempts (and a deferral of the last try) reach get a queue.
    assert retry({"initial": 1, "max": 100, "jitter": 0}, attempts=3).delays() == [1, 2]
    assert retry([1, 2, 3], attempts=2).delays() == [1, 2]
    assert retry([1, 2, 3], attempts=1).delays() == [1]
    data = {"queues": [{"name": "a", "handler": {"python": "m:f"},
                        "retry": {"attempts": 2, "backoff": [1, 2, 3], "max_deferrals": 0}}]}
    assert config.parse(data, "x").queues[0].retry.delays() == [1]


def test_timeout_at_consumer_timeout_warns():
    data = {"queues": [{"name": "a", "handler": {"python": "m:f"}, "timeout": 3600}]}
    cfg = config.parse(data, "w.yaml")
    assert len(cfg.warnings) == 1 and "consumer_timeout" in cfg.warnings[0]


def test_password_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    data = {"broker": {"url": "amqp://app@rabbit/", "password_file": str(secret)}, **GOOD}
    assert config.parse(data, "x").broker.password == "s3cret"
    data["broker"]["password_file"] = str(tmp_path / "missing")
    assert "cannot read" in problems(data)[0]


# --- the command line: one line per problem, exit 2, never a traceback ----

def run_check(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workqd.cli", "--check", "-c", str(path)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    ("queues: [\n  - name: a\n", "YAML syntax error: line"),
    ("queues:\n  - name: a\n    workers: four\n    handler: {python: 'm:f'}\n",
     'queues[0].workers: must be a whole number >= 1, got "four"'),
    ("queues:\n  - name: a\n    handler: {python: 'm:f'}\n    wrokers: 2\n",
     "queues[0].wrokers: unknown key"),
    ("queues:\n  - name: a\n    workers: 0\n    handler: {python: 'm:f'}\n",
     "queues[0].workers: must be a whole number >= 1, got 0"),
    ("just a string\n", "must be a mapping"),
    ("\xff\xfe", "not UTF-8"),
])
def test_check_rejects_bad_input_with_one_clear_line(tmp_path, content, expected):
    path = tmp_path / "workqd.yaml"
    if content is not None:
        path.write_bytes(content.encode("latin-1") if "\xff" in content else content.encode())
    r = run_check(path)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{path}: ") and expected in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_check_accepts_the_shipped_config():
    r = run_check(ROOT / "etc/workqd/workqd.yaml")
    assert r.returncode == 0 and "OK" in r.stdout, r


def test_daemon_with_bad_config_exits_2_without_starting(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"queues": [{"name": "a"}]}))
    r = subprocess.run([sys.executable, "-m", "workqd.cli", "-c", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == f"{path}: queues[0].handler: is required"


def test_unknown_option_exits_2():
    r = subprocess.run([sys.executable, "-m", "workqd.cli", "--frobnicate"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr


# --- duplicate keys, secrets, listen warnings, hash-password -------------

def test_duplicate_key_exits_2_naming_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("queues:\n  - name: a\n    handler: {python: 'm:f'}\n"
                    "    timeout: 5\n    timeout: 6\n")
    r = run_check(path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"{path}: queues[0].timeout: given twice (lines 4 and 5)"


def test_control_characters_in_problems_are_escaped():
    got = problems({"queues": [{"name": "a\nb\x1b[31m", "handler": {"python": "m:f"}}]})
    assert len(got) == 1 and "\n" not in got[0] and "\x1b" not in got[0]
    assert r'"a\nb\x1b[31m"' in got[0]


@pytest.mark.parametrize("url, shown", [
    ("amqp://u:s3cr3t@h:5672/%2F", "amqp://u:***@h:5672/%2F"),
    ("amqp://u:s3cr3t@[::1", "amqp://u:***@[::1"),
    ("amqp://u:s3/cr3t@h/", "amqp://u:***@h/"),
    ("u:s3cr3t@h", "u:***@h"),
    ("amqp://h:5672/%2F", "amqp://h:5672/%2F"),
    ("amqp://u@h/", "amqp://u@h/"),
])
def test_redact_hides_the_password_even_in_malformed_urls(url, shown):
    assert config.redact(url) == shown


def test_no_message_shows_a_url_password():
    for u in ("amqp://u:s3cr3t@[::1", "amqp://u:s3cr3t@h:99999", "http://u:s3cr3t@h/",
              "amqp://u:s3cr3t@h/?bogus=1", "amqp://u:s3/cr3t@h:1/", "amqp://u:s3cr3t@h /"):
        got = problems({"broker": {"url": u}, **GOOD}) + problems({"broker": {"urls": u}, **GOOD})
        assert got and not any("s3cr3t" in line or "cr3t" in line for line in got), got


def _check_warnings(path) -> list[str]:
    r = run_check(path)
    assert r.returncode == 0, r
    return [line for line in r.stderr.splitlines() if line.startswith("warning: ")]


def test_check_warns_about_secrets_readable_by_others(tmp_path):
    secret = tmp_path / "broker.secret"
    secret.write_text("s3cr3t\n")
    path = tmp_path / "workqd.yaml"
    path.write_text(yaml.safe_dump({"broker": {"url": "amqp://app:pw@h/"}, **GOOD}))
    os.chmod(path, 0o644)
    (line,) = _check_warnings(path)
    assert line.startswith(f"warning: {path}: broker.url: holds a password and {path} is readable "
                           f"by every local user (mode 0644): chmod 640 {path} && chown root:workqd")
    assert "pw@" not in line
    os.chmod(path, 0o640)
    assert _check_warnings(path) == []
    path.write_text(yaml.safe_dump({"broker": {"url": "amqp://app@h/", "password_file": str(secret)},
                                    **GOOD}))
    os.chmod(secret, 0o644)
    (line,) = _check_warnings(path)
    assert line.startswith(f"warning: {path}: broker.password_file: {secret} is readable by every "
                           f"local user (mode 0644): chmod 640 {secret}") and "s3cr3t" not in line
    os.chmod(secret, 0o600)
    assert _check_warnings(path) == []
    os.chmod(path, 0o666)
    (line,) = _check_warnings(path)
    assert line.startswith(f"warning: {path}: is writable by every local user")


def test_the_well_known_guest_password_draws_no_warning(tmp_path):
    path = tmp_path / "workqd.yaml"
    path.write_text(yaml.safe_dump({"broker": {"url": "amqp://guest:guest@localhost/"}, **GOOD}))
    os.chmod(path, 0o644)
    assert _check_warnings(path) == []


def test_check_warns_when_metrics_listen_is_not_loopback(tmp_path):
    path = tmp_path / "workqd.yaml"
    path.write_text(yaml.safe_dump({"metrics": {"listen": "0.0.0.0:9464"}, **GOOD}))
    os.chmod(path, 0o640)
    (line,) = _check_warnings(path)
    assert line.startswith(f"warning: {path}: metrics.listen: 0.0.0.0 is not a loopback address")
    for local in ("127.0.0.1:9464", "[::1]:9464", "localhost:9464"):
        path.write_text(yaml.safe_dump({"metrics": {"listen": local}, **GOOD}))
        assert _check_warnings(path) == [], local


def test_daemon_with_unresolvable_listen_host_exits_2(tmp_path):
    path = tmp_path / "workqd.yaml"
    path.write_text(yaml.safe_dump({"metrics": {"listen": "no-such-host.invalid:9464"}, **GOOD}))
    r = subprocess.run([sys.executable, "-m", "workqd.cli", "-c", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"{path}: metrics.listen: cannot resolve no-such-host.invalid")


def hash_password_cli(stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workqd.cli", "hash-password"], input=stdin,
                          capture_output=True, timeout=60)


def test_hash_password_round_trip_through_the_cli(tmp_path):
    r = hash_password_cli(b"correct horse\n")
    assert r.returncode == 0, r
    line = r.stdout.decode().strip()
    assert line.startswith("pbkdf2_sha256$600000$")
    assert webauth.verify_password(line, "correct horse")
    assert not webauth.verify_password(line, "correct horse\n")
    assert not webauth.verify_password(line, "wrong")
    # The line is what metrics.basic_auth takes.
    cfg = config.parse({"metrics": {"basic_auth": {"prom": line}}, **GOOD}, "x.yaml")
    assert cfg.metrics_basic_auth == (("prom", line),)
    assert hash_password_cli(b"correct horse\n").stdout.decode().strip() != line  # salted


@pytest.mark.parametrize("stdin, message", [
    (b"\n", "the password is empty"),
    (b"", "the password is empty"),
    (b"\xff\xfe\n", "the password is not UTF-8 text"),
    (b"x" * 10000, "the password is longer than 4096 bytes"),
])
def test_hash_password_refuses_bad_input(stdin, message):
    r = hash_password_cli(stdin)
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr.decode().strip() == f"workqd hash-password: {message}"


def test_hash_password_from_dev_zero_ends():
    with open("/dev/zero", "rb") as zero:
        r = subprocess.run([sys.executable, "-m", "workqd.cli", "hash-password"], stdin=zero,
                           capture_output=True, timeout=60)
    assert r.returncode == 2 and b"longer than 4096 bytes" in r.stderr


def test_defaults_live_only_in_the_dataclasses():
    """A key left out or null gets exactly the dataclass default."""
    import dataclasses
    q = config.parse(GOOD, "x").queues[0]
    nulls = config.parse({"queues": [{"name": "tasks", "handler": {"python": "m:f"},
                                      **{f.name: None for f in dataclasses.fields(config.Queue)
                                         if f.name not in ("name", "handler")
                                         and "key" not in f.metadata}}]}, "x").queues[0]
    for f in dataclasses.fields(config.Queue):
        if f.name not in ("name", "handler"):   # a field read from another key: its default too
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert getattr(q, f.name) == getattr(nulls, f.name) == default, f.name


# --- reload: every file that used to crash or freeze the master is refused ----

def _crashing_files(tmp_path):
    """(name, how to put it at the config's path) for files that once crashed the config's loading."""
    bad_pw = tmp_path / "pw-latin1"
    bad_pw.write_bytes(b"caf\xe9\n")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))

    def text(content):
        def put(path):
            path.unlink()
            path.write_text(content)
        return put

    def special(make):
        def put(path):
            path.unlink()
            make(path)
        return put

    return [  # (what the refusal says, how to make the file)
        ("broker.url: an IPv6 address must be written [ADDRESS]:PORT",
         text("broker: {url: 'amqp://u:s3cr3t@[::1'}\nqueues: []\n")),
        ("metrics.listen: must be HOST:PORT", text("metrics: {listen: '127.0.0.1:²'}\n")),
        ("pw-latin1 is not UTF-8 text", text(f"broker: {{password_file: '{bad_pw}'}}\n")),
        ("/dev/zero is a character device", text("broker: {password_file: /dev/zero}\n")),
        ("fifo is a FIFO", text(f"broker: {{password_file: '{tmp_path / 'fifo'}'}}\n")),
        ("nested deeper than 64 levels", text("x: " + "[" * 600 + "]" * 600 + "\n")),
        ("aliases expand to more than", text(bomb)),
        ("queues: given twice (lines 1 and 2)", text("queues: []\nqueues: []\n")),
        ("workqd.yaml: is a FIFO", special(os.mkfifo)),
        ("workqd.yaml: is a character device", special(lambda p: p.symlink_to("/dev/zero"))),
        ("workqd.yaml: is larger than 1MiB", special(lambda p: open(p, "wb").truncate(50_000_000))),
    ]


def test_reload_refuses_every_crashing_file_and_keeps_serving(daemon, amqp, qname, tmp_path):
    os.mkfifo(tmp_path / "fifo")
    d = daemon([queue_config(qname, workers=1)])
    pids = d.worker_pids()
    for says, put in _crashing_files(tmp_path):
        put(d.path)
        d.send(signal.SIGHUP)
        wait_for(lambda: f"reload refused, keeping the running config: {d.path}: " in d.log()
                 and says in d.log(), 10, what=f"reload refused: {says}")
        assert d.proc.poll() is None and d.http("/healthz")[0] == 200, (says, d.log())
    log = d.log()
    assert "Traceback" not in log and "s3cr3t" not in log
    assert d.worker_pids() == pids
    mid = amqp.publish(qname, "sleep=0")
    wait_for(lambda: mid in d.ledger.ended_ids(), 15, what="the running config still works")
