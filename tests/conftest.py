"""Fixtures that drive the real daemon against the real RabbitMQ on 127.0.0.1:5672.

A test that needs the broker fails when it is not there; it never skips.

The tests are laid out by tier, and each tier's marker follows from the directory:
tests/unit (no broker, seconds: the loop while editing), tests/integration (the
machine's broker, real processes), tests/cluster (throwaway RabbitMQ nodes) and
tests/system (booted containers). This file stays at the top so that pytest puts
tests/ on sys.path, and the helpers beside it (polling, brokers, taskfns,
forkcheck) import from every tier and in the daemons the fixtures start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pika
import pika.exceptions
import pytest
import yaml
from hypothesis import settings

from polling import wait_for  # noqa: F401  (the tests import it from here)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

# Property tests check behaviour, not speed (bench/ measures that): on a loaded CI
# machine one example can take longer than hypothesis's default 200 ms deadline.
settings.register_profile("workqd", deadline=None)
settings.load_profile("workqd")


# --- tiers, markers and who may run beside whom -------------------------------

TIERS = ("unit", "integration", "cluster", "system")
TIER = pytest.StashKey[str]()
# The throwaway-node fixtures listen on fixed ports (tests/brokers.py: the cluster on
# 5681-5683, the special nodes on 5684-5689; test_submit's lone node on 5691) and are
# session- or module-wide: every test that uses one runs in the same pytest-xdist worker
# as the others using it (--dist loadgroup), or two workers would start two nodes on one
# port. The cluster and the special nodes do not share ports: two groups, two workers.
# The config corpus is a module-wide fixture that runs ~50 CLI processes: once per run,
# not once per worker.
FIXTURE_GROUPS = {"lone_node": "lone-node", "corpus": "config-corpus",
                  "cluster": "cluster-nodes", "healed_cluster": "cluster-nodes"}
FIXTURE_GROUPS.update(dict.fromkeys(
    ("special_node", "plain_node", "tls_node", "mtls_node", "expired_tls_node",
     "timeout_node", "tls_certs"), "special-nodes"))
# The bookworm system test runs the packaged daemon on the host's network against
# the machine's broker, but as a subprocess: it cannot ask for the broker fixture.
MACHINE_BROKER_SYSTEM_TESTS = ("test_debian_package_under_systemd[bookworm]",)
# Collection order, which --dist loadgroup --no-loadscope-reorder keeps: the long
# container and cluster work starts first; the unit tests come next, so the few tests
# xdist queues behind each long job are short ones; the tests that take the machine's
# broker away from everyone come last.
ORDER = {"system": 0, "cluster": 1, "unit": 2, "integration": 3}
OUTAGE_LAST = 4


def tier_of(path: Path) -> str | None:
    try:
        first = path.resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None
    return first if first in TIERS else None


@pytest.hookimpl(tryfirst=True)   # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(item.path)
        if tier is None:
            # A file not yet moved into a tier: integration unless its name says unit.
            tier = "unit" if item.path.name.startswith("test_units_") else "integration"
        item.add_marker(getattr(pytest.mark, tier))
        item.stash[TIER] = tier
        groups = {FIXTURE_GROUPS[f] for f in item.fixturenames if f in FIXTURE_GROUPS}
        if item.get_closest_marker("broker_outage"):
            groups.add("machine-broker-outage")
        if len(groups) > 1:
            raise pytest.UsageError(f"{item.nodeid} needs the workers of {sorted(groups)}: "
                                    f"one test, one group (tests/conftest.py FIXTURE_GROUPS)")
        for group in groups:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: OUTAGE_LAST if item.get_closest_marker("broker_outage")
               else ORDER[item.stash[TIER]])


GROUP_IGNORED = pytest.StashKey[bool]()


class _GroupCheck:
    """Fails the grouped tests, before their fixtures start anything, when --dist loadgroup
    is asked for but has no effect (pytest-xdist 3.8 under pytest 9.2 groups nothing):
    otherwise two workers would start two nodes on one fixed port."""

    @pytest.hookimpl(trylast=True)   # after pytest-xdist has named each test's group
    def pytest_collection_modifyitems(self, config, items):
        if getattr(config.option, "loadgroup", False):
            for item in items:
                if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
                    item.stash[GROUP_IGNORED] = True

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        if item.stash.get(GROUP_IGNORED, False):
            pytest.fail(f"pytest-xdist {xdist_version()} ignored this test's xdist_group under "
                        f"pytest {pytest.__version__}: use pytest<9.2 (as tests/run.sh does)",
                        pytrace=False)


def xdist_version() -> str:
    try:
        from importlib.metadata import version
        return version("pytest-xdist")
    except Exception:  # noqa: BLE001 -- only for the message
        return "?"


def pytest_configure(config):
    config.pluginmanager.register(_GroupCheck(), "workqd-xdist-group-check")


LOCK_DIR = Path(tempfile.gettempdir())
OUTAGE_WAIT = 3600    # seconds a broker-outage test waits for the others to finish
SHARED_WAIT = 900     # seconds a test waits for a broker outage to end
# Fixtures that talk to the machine's broker during the test, beyond the integration tier.
MACHINE_BROKER_FIXTURES = {"amqp", "qname", "broker_user"}


@contextlib.contextmanager
def machine_lock(name: str, exclusive: bool, wait: float, why: str):
    """An flock on a file named for ``name`` in the temp dir, shared or exclusive, across
    pytest processes and xdist workers; fails the test after ``wait`` seconds."""
    path = LOCK_DIR / f"workqd-tests-{name}.lock"
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + wait
    with open(path, "a") as f:
        while True:
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{why} after {wait:.0f}s ({path} is held)")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def machine_broker(exclusive: bool):
    """A readers-writer lock on the machine's broker: tests that use it hold it shared; a
    test that stops the broker or cuts every connection (marked broker_outage) holds it
    alone, once every other test using the broker, in any pytest process, is done."""
    if exclusive:
        return machine_lock("machine-broker", True, OUTAGE_WAIT, "other tests kept the broker")
    return machine_lock("machine-broker", False, SHARED_WAIT, "the broker outage did not end")


@pytest.fixture(autouse=True)
def _machine_broker_access(request):
    """Set up before, and torn down after, every other function-scoped fixture."""
    item = request.node
    outage = item.get_closest_marker("broker_outage") is not None
    uses = (outage or item.stash.get(TIER, None) == "integration"
            or MACHINE_BROKER_FIXTURES & set(item.fixturenames)
            or item.name in MACHINE_BROKER_SYSTEM_TESTS)
    if not uses:
        yield
        return
    with machine_broker(exclusive=outage):
        yield


# Ports handed to daemons come from below the kernel's ephemeral range (32768 up on
# Debian), so the outgoing connection of another test cannot take one between the pick
# and the daemon's bind; the throwaway brokers (56xx and 2xxxx, moved up by at most a
# few hundred with WORKQ_TEST_NODE_OFFSET) sit below this range.
TEST_PORTS = range(27000, 32768)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing is bound to at the moment of the call."""
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(TEST_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {TEST_PORTS.start}-{TEST_PORTS.stop - 1} "
                         f"after 200 tries")


@pytest.fixture(scope="session")
def broker():
    """Fails the test (never skips) when RabbitMQ is not reachable."""
    try:
        with machine_broker(exclusive=False):
            conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    except pika.exceptions.AMQPError as e:
        pytest.fail(f"RabbitMQ is not reachable on 127.0.0.1:5672: {e!r}; "
                    f"start it with: rabbitmq-server -detached && rabbitmqctl await_startup")
    conn.close()
    return BROKER_URL


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl against the machine's broker; fail the test on a non-zero exit."""
    r = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def broker_user(broker):
    """A real user (not guest) with a random password on the machine's broker, deleted after."""
    user, password = f"wq_{secrets.token_hex(4)}", new_password()
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, password
    finally:
        rabbitmqctl("delete_user", user)


def new_password() -> str:
    # token_urlsafe may start with "-", which rabbitmqctl takes for an option.
    return "p" + secrets.token_urlsafe(16)


class Amqp:
    """A small blocking client for test setup and inspection."""

    def __init__(self, url: str = BROKER_URL):
        self.url = url
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()

    def channel(self):
        if self.conn.is_closed:
            self.conn = pika.BlockingConnection(pika.URLParameters(self.url))
        if self.conn.is_closed or self.ch.is_closed:
            self.ch = self.conn.channel()
            self.ch.confirm_delivery()
        return self.ch

    def declare(self, name: str, type_: str = "quorum") -> None:
        self.channel().queue_declare(name, durable=True, arguments={"x-queue-type": type_})

    def publish(self, queue: str, body: str | bytes, message_id: str | None = None,
                **props) -> str:
        ch = self.channel()
        mid = message_id or uuid.uuid4().hex
        ch.basic_publish("", queue, body.encode() if isinstance(body, str) else body,
                         pika.BasicProperties(delivery_mode=2, message_id=mid, **props),
                         mandatory=True)
        return mid

    def count(self, queue: str) -> int:
        """Ready messages (exact, from a passive declare; list_queues lags)."""
        try:
            return self.channel().queue_declare(queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:
            return -1

    def get_all(self, queue: str) -> list[tuple]:
        out = []
        ch = self.channel()
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((props, body))

    def delete(self, *names: str) -> None:
        for name in names:
            try:
                self.channel().queue_delete(name)
            except pika.exceptions.AMQPError:
                pass

    def close(self) -> None:
        try:
            self.conn.close()
        except pika.exceptions.AMQPError:
            pass


@pytest.fixture
def amqp(broker):
    client = Amqp()
    yield client
    client.close()


@pytest.fixture
def qname(request, amqp):
    """A fresh queue name for this test; the queue and its side queues go at teardown."""
    name = f"t.{request.node.name[:40]}.{uuid.uuid4().hex[:6]}".replace("[", ".").replace("]", "")
    yield name
    cleanup = Amqp()
    cleanup.delete(name, f"{name}.dead", *(f"{name}.delay.{d}s" for d in
                                              (0.5, 1, 2, 3, 5, 30)))
    cleanup.close()


class Ledger:
    def __init__(self, path: Path):
        self.path = path

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        text = self.path.read_text()
        # A line being appended right now may be read half-written: only whole lines count.
        complete = text[:text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line]

    def events(self, kind: str) -> list[dict]:
        return [e for e in self.entries() if e["event"] == kind]

    def ended_ids(self) -> set[str]:
        return {e["id"] for e in self.events("end")}


class Daemon:
    """workqd as a real subprocess, on a config written for the test."""

    def __init__(self, tmp_path: Path, queues: list[dict], **top):
        self.tmp = tmp_path
        self.port = free_port()
        self.ledger = Ledger(tmp_path / "ledger.jsonl")
        self.config = {
            "broker": {"url": BROKER_URL, "heartbeat": top.pop("heartbeat", 30)},
            "metrics": {"listen": f"127.0.0.1:{self.port}"},
            "shutdown_timeout": top.pop("shutdown_timeout", 10),
            "log": {"level": top.pop("log_level", "info")},
            "queues": queues,
            **top,
        }
        self.path = tmp_path / "workqd.yaml"
        self.log_path = tmp_path / "workqd.log"
        self.proc: subprocess.Popen | None = None
        self.write_config()

    def write_config(self) -> None:
        self.path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
        env["WORKQ_TEST_LEDGER"] = str(self.ledger.path)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("JOURNAL_STREAM", None)
        return env

    def start(self, wait_ready: bool = True, module: str = "workqd.cli",
              nofile: int | None = None) -> "Daemon":
        """``nofile`` limits the daemon's open files, as systemd's LimitNOFILE= would."""
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) \
            if nofile else None
        for _ in range(3):
            kept = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._log = open(self.log_path, "ab")
            self.proc = subprocess.Popen([sys.executable, "-m", module, "-c", str(self.path)],
                                         stdout=self._log, stderr=subprocess.STDOUT,
                                         env=self.env(), preexec_fn=limit)
            if not wait_ready or not self._lost_its_port():
                break
            # Another process bound the picked port first: a race of the test rig, not
            # the daemon's fault. Pick again; the log keeps no trace of the lost start.
            self._log.close()
            os.truncate(self.log_path, kept)
            self.port = free_port()
            self.config["metrics"]["listen"] = f"127.0.0.1:{self.port}"
            self.write_config()
        if wait_ready:
            self.wait_ready()
        return self

    def _lost_its_port(self) -> bool:
        """True when the daemon exited because its metrics port, picked by this rig, was
        taken. Waits for ready or exit, so ``wait_ready`` afterwards returns at once."""
        if self.config.get("metrics", {}).get("listen") != f"127.0.0.1:{self.port}":
            return False
        self._wait_ready_or_exit(15)
        return (self._died() and f"metrics.listen 127.0.0.1:{self.port}: address already in use"
                in self.log())

    def _wait_ready_or_exit(self, timeout: float) -> None:
        wait_for(lambda: self.http("/readyz")[0] == 200 or self._died(), timeout,
                 what=lambda: f"workqd ready; log:\n{self.log()}")

    def wait_ready(self, timeout: float = 15) -> None:
        self._wait_ready_or_exit(timeout)
        assert self.proc.poll() is None, f"workqd exited {self.proc.returncode}:\n{self.log()}"

    def _died(self) -> bool:
        return self.proc.poll() is not None

    def http(self, path: str) -> tuple[int, str]:
        """(status, body); (0, why) when no HTTP answer came (refused, reset, 5 s timeout)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, ConnectionError, socket.timeout) as e:
            return 0, f"{type(e).__name__}: {e}"

    def metrics(self) -> dict[str, float]:
        """Samples by ``name{labels}`` as exposed, e.g. ``workqd_workers{queue="q",state="idle"}``."""
        status, text = self.http("/metrics")
        # No answer at all once cost a CI run its cause: keep what the daemon said.
        assert status == 200, (f"/metrics answered {status}"
                               + (f" ({text}); the daemon's log ends:\n{self.log()[-3000:]}"
                                  if status == 0 else ""))
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base != name:
                continue
            pairs = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if p)
            if all(pairs.get(k) == f'"{v}"' for k, v in labels.items()):
                total += value
        return total

    def _children(self) -> list[tuple[int, str]]:
        """(pid, comm) of each live child of the master."""
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm, fields = stat.split("(", 1)[1].rsplit(")", 1)[0], stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                children.append((int(entry.name), comm))
        return children

    def worker_pids(self) -> list[int]:
        return sorted(pid for pid, comm in self._children() if comm != "workqd-poller")

    def poller_pid(self) -> int | None:
        return next((pid for pid, comm in self._children() if comm == "workqd-poller"), None)

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"workqd did not stop within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def daemon(tmp_path, broker):
    """Factory: ``daemon(queues=[...], **top_level_keys)``; every daemon is stopped at teardown."""
    started: list[Daemon] = []

    def make(queues: list[dict], start: bool = True, **top) -> Daemon:
        sub = tmp_path / f"d{len(started)}"
        sub.mkdir()
        d = Daemon(sub, queues, **top)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
        # Workers die with the master's KILL only if they notice; make sure.
        for pid in _children_of(d):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _children_of(d: Daemon) -> list[int]:
    if d.proc is None:
        return []
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes()
            except OSError:
                continue
            if f"WORKQ_TEST_LEDGER={d.ledger.path}".encode() in env:
                out.append(int(entry.name))
    return out


def queue_config(name: str, **overrides) -> dict:
    q = {"name": name, "type": "classic", "workers": 2, "prefetch": 1,
         "handler": {"python": "taskfns:work"}, "timeout": 60,
         "retry": {"attempts": 1, "backoff": [1]}}
    q.update(overrides)
    return q


# Throwaway nodes beside the main broker (tests/brokers.py): a 3-node cluster, TLS,
# consumer_timeout and alarm nodes. Imported here so every test module can use them.
from brokers import (cluster, expired_tls_node, healed_cluster, mtls_node,  # noqa: E402,F401
                     plain_node, special_node, timeout_node, tls_certs, tls_node)
