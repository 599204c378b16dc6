"""Config validation: pure logic, plus the command line's one-line errors and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workqd import config

ROOT = Path(__file__).resolve().parent.parent
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
