"""What every benchmark shares: the broker, the processes under test, and their measurement.

Each system runs as real processes (started with the Python of the venv it is
measured with) against the RabbitMQ on 127.0.0.1:5672. The bench itself never
sleeps blindly: it polls the broker, the stamp files or /readyz with deadlines.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
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
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# Another checkout of workqd to measure instead of this one (A/B a patch): its root directory.
WORKQD_ROOT = os.environ.get("BENCH_WORKQD_ROOT", str(ROOT))
URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PREFIX = "bench."   # every queue the bench creates starts with this


class BenchError(RuntimeError):
    """A run that cannot produce a valid number (broker missing, system did not drain...)."""


def wait_for(predicate, timeout: float, interval: float = 0.01, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


CREATED: list[str] = []   # every queue name handed out, for a final sweep


def queue_name(kind: str) -> str:
    name = f"{PREFIX}{kind}.{uuid.uuid4().hex[:8]}"
    CREATED.append(name)
    return name


def sweep(admin: "Admin") -> None:
    """Delete whatever the bench created and a failed run could not clean up (broker gone)."""
    for name in CREATED:
        admin.delete(name, f"{name}.dead", f"{name}.DQ", f"{name}.XQ")
        admin.delete_exchange(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the broker ------------------------------------------------------------------

class Admin:
    """A blocking connection for setup, depth checks and cleanup (never on the hot path).

    It reconnects by itself: other users of a shared broker may restart it.
    """

    def __init__(self, url: str = URL):
        self.url = url
        self.conn = self.ch = None
        self.channel()

    def channel(self):
        if self.conn is None or self.conn.is_closed:
            try:
                self.conn = pika.BlockingConnection(pika.URLParameters(self.url))
            except pika.exceptions.AMQPError as e:
                raise BenchError(f"RabbitMQ is not reachable at {self.url}: {e!r}") from None
            self.ch = None
        if self.ch is None or self.ch.is_closed:
            self.ch = self.conn.channel()
        return self.ch

    def _do(self, fn):
        try:
            return fn(self.channel())
        except (pika.exceptions.StreamLostError, pika.exceptions.ConnectionClosed,
                pika.exceptions.AMQPConnectionError):
            self.conn = None
            return fn(self.channel())

    def server_version(self) -> str:
        self.channel()
        props = self.conn._impl.server_properties or {}
        v = props.get("version", b"?")
        return v.decode() if isinstance(v, bytes) else str(v)

    def declare(self, name: str, arguments: dict | None = None) -> None:
        self._do(lambda ch: ch.queue_declare(name, durable=True, arguments=arguments))

    def _passive(self, name: str):
        def fn(ch):
            try:
                return ch.queue_declare(name, passive=True).method
            except pika.exceptions.ChannelClosedByBroker:
                return None
        return self._do(fn)

    def depth(self, name: str) -> int:
        """Messages ready in ``name`` (exact, from a passive declare); -1: no such queue."""
        m = self._passive(name)
        return -1 if m is None else m.message_count

    def consumers(self, name: str) -> int:
        m = self._passive(name)
        return -1 if m is None else m.consumer_count

    def exists(self, name: str) -> bool:
        return self._passive(name) is not None

    def delete(self, *names: str) -> None:
        for name in names:
            try:
                self._do(lambda ch: ch.queue_delete(name))
            except (pika.exceptions.AMQPError, BenchError):
                pass

    def delete_exchange(self, *names: str) -> None:
        for name in names:
            try:
                self._do(lambda ch: ch.exchange_delete(name))
            except (pika.exceptions.AMQPError, BenchError):
                pass

    def close(self) -> None:
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        except pika.exceptions.AMQPError:
            pass


def fill(queue: str, items, admin: Admin) -> None:
    """Publish (body, properties) pairs with pipelined confirms and check they all landed."""
    from pika_publish import publish_pipelined
    items = list(items)
    before = admin.depth(queue)
    acked = publish_pipelined(URL, queue, items, window=2000)
    if acked != len(items):
        raise BenchError(f"prefill of {queue}: {acked} of {len(items)} confirmed")
    wait_for(lambda: admin.depth(queue) == before + len(items), 30, 0.02,
             f"{len(items)} messages ready in {queue}")


def persistent(**kw) -> pika.BasicProperties:
    return pika.BasicProperties(delivery_mode=2, **kw)


def bodies(n: int, size: int) -> list[bytes]:
    """``n`` distinct bodies of exactly ``size`` bytes (a number, then padding)."""
    out = []
    for i in range(n):
        head = f"task-{i:07d} ".encode()
        out.append((head + b"x" * max(0, size - len(head)))[:max(size, len(head))])
    return out


# --- processes -------------------------------------------------------------------

def venv_env(python: str, extra: dict | None = None) -> dict:
    """Environment for a process under test: its venv first on PATH, bench/ importable."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(python).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), WORKQD_ROOT])
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOURNAL_STREAM", None)
    env.pop("PYTHONSTARTUP", None)
    env.update(extra or {})
    return env


class Procs:
    """A set of processes started together, stopped together (TERM, then KILL at a deadline)."""

    def __init__(self, argvs: list[list[str]], env: dict, log_path: Path | None = None,
                 cwd: Path | None = None):
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.procs = [subprocess.Popen(a, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                       cwd=cwd, start_new_session=True) for a in argvs]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def pids(self) -> list[int]:
        """Every process of the set, children included."""
        out = []
        for p in self.procs:
            out.extend(process_tree(p.pid))
        return out

    def stop(self, timeout: float = 20) -> None:
        for p in self.procs:
            _signal_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            _signal_group(p.pid, signal.SIGKILL)  # stragglers, and children of the dead
            if p.poll() is None:
                p.wait(5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    def last_line(self) -> str:
        lines = self.log().strip().splitlines()
        return lines[-1] if lines else "(no output)"


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def process_tree(root: int) -> list[int]:
    """``root`` and all its living descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid == root and not os.path.exists(f"/proc/{pid}"):
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(sum of VmRSS, sum of Pss) in KiB over ``pids``."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            pass
    return rss, pss


_TCK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    """User + system seconds of a process (its reaped children not included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def _broker_pids() -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == "beam.smp":
                        out.append(int(entry))
            except OSError:
                pass
    return out


class CpuWatch:
    """How busy the machine was with work other than the bench, the system under test and
    the broker, while one measurement ran (other sessions' tests, say): a noise indicator."""

    def __init__(self):
        self.broker = _broker_pids()
        self.t0 = time.monotonic()
        self.busy0 = _busy_seconds()
        self.broker0 = sum(_proc_cpu(p) for p in self.broker)
        self.self0 = _proc_cpu(os.getpid())

    def other_load(self, sut_pids: list[int]) -> float:
        """Share of all cores used by others since start; ``sut_pids`` started after it."""
        elapsed = time.monotonic() - self.t0
        busy = _busy_seconds() - self.busy0
        ours = (sum(_proc_cpu(p) for p in self.broker) - self.broker0
                + _proc_cpu(os.getpid()) - self.self0 + sum(_proc_cpu(p) for p in sut_pids))
        return max(0.0, (busy - ours) / (elapsed * (os.cpu_count() or 1))) if elapsed > 0 else 0.0


def _busy_seconds() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / _TCK


class StampDir:
    """A tmpfs directory where ``benchtasks.stamp`` leaves one file per process."""

    def __init__(self):
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.path = tempfile.mkdtemp(prefix="workqd-bench-", dir=base)

    def read(self):
        from benchtasks import read_stamps
        return read_stamps(self.path)

    def count(self) -> int:
        return sum(s[1] for s in self.read())

    def window(self) -> tuple[int, float, float]:
        """(calls, first call, last call) over every process."""
        stamps = [s for s in self.read() if s[1] > 0]
        if not stamps:
            return 0, 0.0, 0.0
        return (sum(s[1] for s in stamps), min(s[2] for s in stamps), max(s[3] for s in stamps))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# --- workqd ----------------------------------------------------------------------

class Workqd:
    """The daemon as a real process on a config written for one run."""

    def __init__(self, python: str, workdir: Path, queues: list[dict], env: dict | None = None,
                 log_level: str = "warning"):
        self.python = python
        self.workdir = workdir
        self.port = free_port()
        self.config = {
            "broker": {"url": URL},
            "metrics": {"listen": f"127.0.0.1:{self.port}"},
            "shutdown_timeout": 10,
            "log": {"level": log_level},
            "queues": queues,
        }
        self.path = workdir / f"workqd-{self.port}.yaml"
        self.path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.env = venv_env(python, env)
        self.procs: Procs | None = None
        self.started = 0.0

    @staticmethod
    def queue(name: str, qtype: str, workers: int, prefetch: int,
              handler: str = "benchtasks:stamp", **extra) -> dict:
        q = {"name": name, "type": qtype, "workers": workers, "prefetch": prefetch,
             "handler": {"python": handler}, "timeout": 300, "retry": {"attempts": 1}}
        q.update(extra)
        return q

    def start(self) -> "Workqd":
        workqd = str(Path(self.python).parent / "workqd")
        argv = [workqd] if os.path.exists(workqd) else [self.python, "-m", "workqd.cli"]
        self.started = time.monotonic()
        self.procs = Procs([[*argv, "-c", str(self.path)]], self.env,
                           self.workdir / f"workqd-{self.port}.log")
        return self

    @property
    def pid(self) -> int:
        return self.procs.procs[0].pid

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            return 0, ""

    def wait_ready(self, timeout: float = 30, interval: float = 0.005) -> float:
        """Seconds from start until /readyz answered 200."""
        def ready():
            if not self.procs.alive():
                raise BenchError(f"workqd exited {self.procs.procs[0].returncode}: "
                                 f"{self.procs.last_line()}")
            return self.http("/readyz")[0] == 200
        wait_for(ready, timeout, interval, "workqd /readyz")
        return time.monotonic() - self.started

    def metrics(self) -> dict[str, float]:
        status, text = self.http("/metrics")
        if status != 200:
            raise BenchError(f"/metrics answered {status}")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def metric(self, name: str, **labels) -> float:
        total = 0.0
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base != name:
                continue
            pairs = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if p)
            if all(pairs.get(k) == f'"{v}"' for k, v in labels.items()):
                total += value
        return total

    def alive(self) -> bool:
        return self.procs.alive()

    def log(self) -> str:
        return self.procs.log()

    def last_line(self) -> str:
        return self.procs.last_line()

    def worker_pids(self) -> list[int]:
        # Since the redesign the master has one more child, the queue poller.
        return [p for p in process_tree(self.pid) if p != self.pid and _comm(p) != POLLER_COMM]

    def poller_pids(self) -> list[int]:
        return [p for p in process_tree(self.pid) if _comm(p) == POLLER_COMM]

    def pids(self) -> list[int]:
        return process_tree(self.pid)

    def stop(self) -> None:
        if self.procs is not None:
            self.procs.stop()


POLLER_COMM = "workqd-poller"   # the queue poller's process name (ps, /proc/PID/comm)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def versions(python: str) -> dict[str, str]:
    """Versions of the interesting packages in the venv of ``python``."""
    code = ("import importlib.metadata as m, json, platform\n"
            "out={'python': platform.python_version()}\n"
            "for n in ('pika','workqd','prometheus-client','celery','kombu','amqp','dramatiq',"
            "'matplotlib'):\n"
            "    try: out[n]=m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    import json
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def python_of(venv: str | None) -> str:
    return str(Path(venv) / "bin" / "python") if venv else sys.executable
