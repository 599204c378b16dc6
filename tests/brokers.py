"""Throwaway RabbitMQ nodes beside the machine's broker: a 3-node cluster and special nodes.

Follows ../shared/CLUSTER-TESTS.md: upstream scripts in /usr/lib/rabbitmq/bin (the
/usr/sbin wrappers switch to the main node's user and cookie), a private HOME with its
own Erlang cookie for the servers and every CLI call, loopback-only listeners, no plugins,
`net_ticktime 10`, `cluster_partition_handling = autoheal`. Nodes are found by their pid
files only (the node name is not on the beam command line).

Ports: the cluster uses AMQP 5681-5683 / distribution 25681-25683, special nodes take
5684-5689 / 25684-25689 in the order they are first asked for. The fixtures fail, never
skip, when RabbitMQ is not installed, and always tear down (SIGCONT first).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from polling import wait_for

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
KERNEL_ARGS = "-kernel inet_dist_use_interface {127,0,0,1} -kernel net_ticktime 10"
# WORKQ_TEST_NODE_OFFSET moves every throwaway node's ports up and suffixes its Erlang
# name, so two checkouts can run cluster tests on one machine at once (0 in CI).
OFFSET = int(os.environ.get("WORKQ_TEST_NODE_OFFSET", "0"))
NAME_SUFFIX = f"o{OFFSET}" if OFFSET else ""
CLUSTER_NODES = {"wqa": (5681 + OFFSET, 25681 + OFFSET), "wqb": (5682 + OFFSET, 25682 + OFFSET),
                 "wqc": (5683 + OFFSET, 25683 + OFFSET)}
SPECIAL_PORTS = range(5684 + OFFSET, 5690 + OFFSET)   # AMQP (or TLS) port P, distribution 20000 + P
START_TIMEOUT = 120                   # seconds a node gets to boot (2 shared cores)
CLI_TIMEOUT = 90                      # seconds for one rabbitmqctl call
# One cluster_status: a CLI node of its own, which a loaded machine can take 30 s to start.
STATUS_TIMEOUT = 60
# Between two rounds of health checks: a round is three CLI nodes at about a second of
# CPU each, and CI's process accounting counted such calls at a fifth of its CPU.
HEALTH_INTERVAL = 2
STOP_APP_TIMEOUT = 360                # above RabbitMQ's own 300 s for a child to stop (stop_app)


def poll(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """``wait_for`` at the pace of rabbitmqctl calls."""
    return wait_for(predicate, timeout, interval, what)


def require_rabbitmq() -> None:
    """Fail (never skip) when the upstream RabbitMQ scripts are missing."""
    missing = [p for p in ("rabbitmq-server", "rabbitmqctl", "rabbitmq-queues")
               if not (RABBIT_BIN / p).exists()]
    if missing:
        pytest.fail(f"RabbitMQ is not installed: {', '.join(str(RABBIT_BIN / p) for p in missing)} "
                    f"missing; install it with: apt-get install rabbitmq-server")


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Node:
    """One RabbitMQ node under ``base``: its files, its environment, its CLI."""

    def __init__(self, base: Path, name: str, port: int, dist: int, conf: list[str],
                 advanced: str = "[].", tcp: bool = True):
        self.base = base
        self.name = name
        self.node = f"{name}{NAME_SUFFIX}@localhost"
        self.port = port
        self.dist = dist
        self.dir = base / name
        self.pidfile = self.dir / "mnesia" / f"{self.node}.pid"
        self.log_dir = self.dir / "log"
        self.tcp = tcp
        self.dir.mkdir(parents=True)
        (self.dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        (self.dir / "advanced.config").write_text(advanced + "\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")

    def env(self) -> dict:
        # Nothing RabbitMQ- or Erlang-related leaks in from the caller's environment.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(self.base / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_DIST_PORT": str(self.dist),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": KERNEL_ARGS,
            "RABBITMQ_CTL_ERL_ARGS": KERNEL_ARGS,
        })
        if self.tcp:
            # Without these the node would listen on 0.0.0.0:5672, the main broker's port.
            env["RABBITMQ_NODE_IP_ADDRESS"] = "127.0.0.1"
            env["RABBITMQ_NODE_PORT"] = str(self.port)
        return env

    # --- CLI ---------------------------------------------------------------

    def cli(self, tool: str, *args: str, timeout: float = CLI_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run ``tool -n NODE args`` with this node's HOME/cookie (never the main node's)."""
        proc = subprocess.run([str(RABBIT_BIN / tool), "-n", self.node, *args],
                              env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} -n {self.node} {' '.join(args)} exited "
                                 f"{proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def ctl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.cli("rabbitmqctl", *args, **kw)

    def json(self, tool: str, *args: str, **kw):
        """A CLI command's ``--formatter json`` answer, parsed."""
        out = self.cli(tool, *args, "--formatter", "json", "--quiet", **kw).stdout
        return json.loads(out) if out.strip() else None

    # --- process -------------------------------------------------------------

    def pid(self) -> int | None:
        """The beam pid from the pid file, if that process is alive."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def start(self) -> None:
        """Launch detached; ``wait_started`` waits for it."""
        if port_in_use(self.port):
            raise AssertionError(f"port 127.0.0.1:{self.port} is taken: a stale test node? "
                                 f"(look for /tmp/wqnodes.*/*/mnesia/*.pid)")
        if self.pidfile.exists() and self.pid() is None:
            self.pidfile.unlink()   # kill -9 leaves it behind; `wait` would read the dead pid
        subprocess.run([str(RABBIT_BIN / "rabbitmq-server"), "-detached"], env=self.env(),
                       check=True, capture_output=True, timeout=60)

    def wait_started(self) -> None:
        # -detached returns long before the VM registers with epmd: `wait PIDFILE` first.
        self.ctl("wait", str(self.pidfile), "--timeout", str(START_TIMEOUT),
                 timeout=START_TIMEOUT + 30)
        self.ctl("await_startup", "--timeout", str(START_TIMEOUT), timeout=START_TIMEOUT + 30)

    def shutdown(self) -> None:
        """Stop the node and wait until its process is gone (SIGKILL after a deadline)."""
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGCONT)   # a frozen node cannot shut down
        except ProcessLookupError:
            return
        try:
            self.ctl("shutdown", "--timeout", "60", timeout=90, check=False)
        except subprocess.TimeoutExpired:
            pass
        try:
            poll(lambda: not pid_alive(pid), 20, what=f"{self.node} (pid {pid}) gone")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)
            poll(lambda: not pid_alive(pid), 10, what=f"{self.node} (pid {pid}) killed")

    def log_text(self) -> str:
        logs = sorted(self.log_dir.glob("*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)


def _new_base(prefix: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    home = base / "home"
    home.mkdir()
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(20).upper())
    cookie.chmod(0o400)
    return base


def _parallel(fn, items) -> list:
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as ex:
        return list(ex.map(fn, items))


class Cluster:
    """wqa, wqb, wqc as one cluster; every method names a node by its short name."""

    def __init__(self):
        self.base = _new_base("wqcluster.")
        conf = ["cluster_partition_handling = autoheal", "loopback_users.guest = true"]
        self.nodes = {name: Node(self.base, name, port, dist, conf)
                      for name, (port, dist) in CLUSTER_NODES.items()}
        self.urls = [f"amqp://guest:guest@127.0.0.1:{n.port}/%2F" for n in self.nodes.values()]
        self.frozen: set[str] = set()
        self.app_stopped: set[str] = set()
        self.status_errors: dict[str, str] = {}   # why each node's last status read failed
        self.timings: dict[str, float] = {}

    def url(self, name: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.nodes[name].port}/%2F"

    # --- life cycle ------------------------------------------------------

    def start(self) -> None:
        t0 = time.monotonic()
        for node in self.nodes.values():
            node.start()
        _parallel(lambda n: n.wait_started(), list(self.nodes.values()))
        self.timings["nodes_started"] = time.monotonic() - t0
        first = self.nodes["wqa"]
        for name in ("wqb", "wqc"):
            node = self.nodes[name]
            node.ctl("stop_app")
            node.ctl("reset")
            # join_cluster prints alarming but harmless stderr (feature flags file,
            # tracked connection tables): cluster_status is the check, not stderr.
            node.ctl("join_cluster", first.node)
            node.ctl("start_app")
        first.ctl("await_online_nodes", "3", "--timeout", str(START_TIMEOUT),
                  timeout=START_TIMEOUT + 30)
        # All three are online as wqa sees them. CI once saw wqa list all three running
        # while wqb's and wqc's own cluster_status never answered, for six minutes: the
        # repair (kill -9 and start again; the node rejoins from its data directory) is
        # what brought such a node back after a SIGSTOP, and it serves here too.
        self.wait_healthy(180)
        self.timings["ready"] = time.monotonic() - t0

    def teardown(self) -> None:
        """SIGCONT, parallel shutdown, no pid may survive, remove the files."""
        for name in list(self.frozen):
            self.thaw(name)
        pids = [n.pid() for n in self.nodes.values()]
        t0 = time.monotonic()
        _parallel(lambda n: n.shutdown(), list(self.nodes.values()))
        self.timings["teardown"] = time.monotonic() - t0
        survivors = [p for p in pids if p and pid_alive(p)]
        shutil.rmtree(self.base, ignore_errors=True)
        assert not survivors, f"cluster nodes survived teardown: pids {survivors}"

    # --- what a test does to a node -----------------------------------

    def ctl(self, name: str, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.nodes[name].ctl(*args, **kw)

    def queues_cli(self, name: str, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.nodes[name].cli("rabbitmq-queues", *args, **kw)

    def pid(self, name: str) -> int:
        pid = self.nodes[name].pid()
        assert pid, f"{name} has no live pid ({self.nodes[name].pidfile})"
        return pid

    def kill9(self, name: str) -> None:
        pid = self.pid(name)
        os.kill(pid, signal.SIGKILL)
        poll(lambda: not pid_alive(pid), 10, what=f"{name} (pid {pid}) dead")
        # The listening socket can outlive the pid by a moment; a restart needs the port.
        port = self.nodes[name].port
        poll(lambda: not port_in_use(port), 30, what=f"{name}'s port {port} free")

    def stop_app(self, name: str) -> None:
        # A node hands over the leadership of every quorum queue it leads as its app
        # stops (the work queues and the vhost's delay levels): on a loaded machine that
        # has taken longer than one ordinary CLI call may. Stopping the second of three
        # nodes has taken 275 s: RabbitMQ 3.10 gives some of its children 300 s to stop
        # (its log: {shutdown,300000}), and one of them waited that long, the quorum
        # going with the node. The bound covers the broker's own.
        self.ctl(name, "stop_app", timeout=STOP_APP_TIMEOUT)
        self.app_stopped.add(name)

    def start_app(self, name: str) -> None:
        # After a stop that took the broker's full bound, starting has outlasted 90 s.
        self.ctl(name, "start_app", timeout=STOP_APP_TIMEOUT)
        self.app_stopped.discard(name)

    def freeze(self, name: str) -> None:
        os.kill(self.pid(name), signal.SIGSTOP)
        self.frozen.add(name)

    def thaw(self, name: str) -> None:
        pid = self.nodes[name].pid()
        if pid:
            os.kill(pid, signal.SIGCONT)
        self.frozen.discard(name)

    def restart(self, name: str) -> None:
        """Start a node whose process is gone (kill -9, shutdown); it rejoins by itself."""
        node = self.nodes[name]
        assert node.pid() is None, f"{name} is still running (pid {node.pid()})"
        node.start()
        node.wait_started()
        self.app_stopped.discard(name)

    def running(self) -> list[str]:
        """Names of nodes whose process is alive and not frozen."""
        return [n for n, node in self.nodes.items() if node.pid() and n not in self.frozen]

    def any_up(self) -> str:
        up = [n for n in self.running() if n not in self.app_stopped]
        assert up, "no cluster node is up"
        return up[0]

    # --- health ----------------------------------------------------------

    def status(self, name: str) -> dict | None:
        """``cluster_status`` as ``name`` answers it; None when it gave no answer this time."""
        try:
            answer = self.nodes[name].json("rabbitmqctl", "cluster_status",
                                           timeout=STATUS_TIMEOUT)
        except (AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            self.status_errors[name] = f"{type(e).__name__}: {e}"
            return None
        if answer is None:
            self.status_errors[name] = "rabbitmqctl printed nothing"
        return answer

    def answered_status(self, name: str, timeout: float = 90) -> dict:
        """``status`` retried until ``name`` answers: a loaded machine can make one call
        fail (a CLI node that cannot start in time) while the broker is fine."""
        answers: list[dict] = []
        poll(lambda: answers.append(self.status(name)) or answers[-1] is not None, timeout,
             interval=1, what=lambda: (f"an answer to cluster_status from {name}; last error: "
                                       f"{self.status_errors.get(name, 'none')}"))
        return answers[-1]

    def is_healthy(self) -> bool:
        """Every node sees 3 running nodes and no partitions."""
        names = list(self.nodes)
        if any(n in self.frozen for n in names):
            return False
        statuses = _parallel(self.status, names)
        for s in statuses:
            if not s or len(s.get("running_nodes", [])) != 3 or s.get("partitions"):
                return False
        return True

    def wait_healthy(self, timeout: float = 120, heal: bool = True) -> float:
        """Wait for a healthy cluster; returns seconds taken.

        With ``heal``, a node still partitioned halfway through (after a SIGSTOP;
        autoheal usually, not always, fixes it) gets stop_app + start_app.
        """
        t0 = time.monotonic()
        try:
            poll(self.is_healthy, timeout / 2 if heal else timeout, interval=HEALTH_INTERVAL,
                 what="a healthy cluster")
        except AssertionError:
            if not heal:
                raise AssertionError(f"cluster not healthy: {self.describe()}") from None
            self.repair()
            try:
                poll(self.is_healthy, timeout / 2, interval=HEALTH_INTERVAL,
                     what="a healthy cluster")
            except AssertionError:
                raise AssertionError(f"cluster not healthy after healing: "
                                     f"{self.describe()}") from None
        return time.monotonic() - t0

    def repair(self) -> None:
        """What autoheal left undone. A node that still reports a partition gets stop_app
        + start_app (CLUSTER-TESTS.md, pitfall 8). A node whose own CLI cannot read its
        cluster status is killed and started again; it rejoins from its data directory.
        (Seen once in CI after a SIGSTOP: wqa and wqc listed wqb as running with no
        partition, wqb listed no listeners, and its own cluster_status gave nothing for
        120 s.) Each repair is printed with the node's log tail, for the test's output."""
        for name, node in self.nodes.items():
            s = self.status(name)
            if s is None:
                print(f"repair: {name} does not answer cluster_status; kill -9 and start. "
                      f"Its log ends:\n{_tail(node.log_text(), 20)}")
                if node.pid():
                    self.kill9(name)
                self.restart(name)
            elif s.get("partitions"):
                print(f"repair: {name} reports a partition; stop_app + start_app")
                self.ctl(name, "stop_app")
                self.ctl(name, "start_app")

    def describe(self) -> str:
        """What each node says of the cluster: its running nodes and partitions, or why
        it did not answer."""
        parts = []
        for n in self.nodes:
            s = self.status(n)
            parts.append(f"{n}: running {s.get('running_nodes')}, partitions "
                         f"{s.get('partitions')}, alarms {s.get('alarms')}" if s else
                         f"{n}: no answer ({self.status_errors.get(n, 'unknown')})")
        return "; ".join(parts)

    def heal(self) -> float:
        """Bring every node back (thaw, start_app, restart) and wait healthy; seconds taken."""
        t0 = time.monotonic()
        for name in list(self.frozen):
            self.thaw(name)
        for name, node in self.nodes.items():
            if node.pid() is None:
                self.restart(name)
        for name in list(self.app_stopped):
            self.start_app(name)
        self.wait_healthy(120)
        return time.monotonic() - t0

    # --- inspection ------------------------------------------------------

    def queue_info(self, queue: str, via: str | None = None) -> dict | None:
        rows = self.nodes[via or self.any_up()].json(
            "rabbitmqctl", "list_queues", "name", "type", "leader", "members", "online",
            "consumers", "messages")
        for row in rows or []:
            if row.get("name") == queue:
                return row
        return None

    def leader(self, queue: str, via: str | None = None) -> str | None:
        """Short name of the quorum queue's leader (``wqa``), from list_queues."""
        info = self.queue_info(queue, via)
        leader = info and info.get("leader")
        # Under WORKQ_TEST_NODE_OFFSET the node is wqa<suffix>@localhost: the short name
        # is what every test compares with.
        return str(leader).split("@")[0].removesuffix(NAME_SUFFIX) if leader else None

    def quorum_status(self, queue: str, via: str | None = None) -> list[dict]:
        return self.nodes[via or self.any_up()].json("rabbitmq-queues", "quorum_status", queue)

    def connections(self, via: str | None = None) -> list[dict]:
        """Every client connection in the cluster: name, node (short), connection_name."""
        # list_connections has no node column; the server-side port names the node.
        by_port = {n.port: name for name, n in self.nodes.items()}
        rows = self.nodes[via or self.any_up()].json(
            "rabbitmqctl", "list_connections", "name", "port", "client_properties")
        out = []
        for row in rows or []:
            out.append({"name": row.get("name"), "node": by_port.get(row.get("port")),
                        "connection_name": _client_property(row.get("client_properties"),
                                                            "connection_name")})
        return out

    def node_of_connection(self, connection_name: str, via: str | None = None) -> str | None:
        """The node a client connection (its ``connection_name`` property) is on."""
        for c in self.connections(via):
            if c["connection_name"] == connection_name:
                return c["node"]
        return None


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _client_property(props, key: str):
    """One client property from list_connections' JSON (a dict, or a list of triples)."""
    if isinstance(props, dict):
        return props.get(key)
    for item in props or []:
        if isinstance(item, (list, tuple)) and len(item) >= 3 and item[0] == key:
            return item[2]
    return None


# --- special single nodes -----------------------------------------------------

class Certs:
    """A test PKI made with openssl: CA, server (localhost, 127.0.0.1), client, expired
    server, and a second CA with its own server and client certificates."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "newcerts").mkdir()
        (self.dir / "index.txt").write_text("")
        (self.dir / "serial").write_text("1000\n")
        self.cnf = self.dir / "openssl.cnf"
        self.cnf.write_text(_OPENSSL_CNF.replace("@DIR@", str(self.dir)))
        self.ca = self._ca("ca", "workq test CA")
        self.other_ca = self._ca("other-ca", "workq other CA")
        self.server = self._leaf("server", "localhost", "server_ext", "ca")
        self.client = self._leaf("client", "workq-client", "client_ext", "ca")
        self.expired = self._leaf("expired", "localhost", "server_ext", "ca", expired=True)
        self.other_server = self._leaf("other-server", "localhost", "server_ext", "other-ca")
        self.other_client = self._leaf("other-client", "workq-client", "client_ext", "other-ca")

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def _openssl(self, *args: str) -> None:
        proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60,
                              cwd=self.dir)
        assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stderr}"

    def _key(self, name: str) -> str:
        key = self.path(f"{name}.key")
        self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                      "-out", key)
        os.chmod(key, 0o644)   # the test nodes run as this user; readable is enough
        return key

    def _ca(self, name: str, cn: str) -> str:
        key = self._key(name)
        pem = self.path(f"{name}.pem")
        self._openssl("req", "-new", "-x509", "-config", str(self.cnf), "-extensions", "ca_ext",
                      "-key", key, "-subj", f"/CN={cn}", "-days", "3", "-out", pem)
        return pem

    def _leaf(self, name: str, cn: str, ext: str, ca: str, expired: bool = False) -> str:
        key = self._key(name)
        csr = self.path(f"{name}.csr")
        pem = self.path(f"{name}.pem")
        self._openssl("req", "-new", "-config", str(self.cnf), "-key", key, "-subj", f"/CN={cn}",
                      "-out", csr)
        if expired:
            # openssl 3.0's x509 cannot back-date; `openssl ca` can.
            self._openssl("ca", "-batch", "-config", str(self.cnf), "-name", "test_ca",
                          "-cert", self.path(f"{ca}.pem"), "-keyfile", self.path(f"{ca}.key"),
                          "-in", csr, "-out", pem, "-extensions", ext, "-notext",
                          "-startdate", "20200101000000Z", "-enddate", "20200102000000Z")
        else:
            self._openssl("x509", "-req", "-in", csr, "-CA", self.path(f"{ca}.pem"),
                          "-CAkey", self.path(f"{ca}.key"), "-CAcreateserial", "-days", "3",
                          "-extfile", str(self.cnf), "-extensions", ext, "-out", pem)
        return pem


_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
[client_ext]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
[ca]
default_ca = test_ca
[test_ca]
dir = @DIR@
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
default_md = sha256
policy = any_policy
unique_subject = no
[any_policy]
commonName = supplied
"""


class SpecialNode(Node):
    """A single node with extra rabbitmq.conf lines, started once per session."""

    def __init__(self, base: Path, key: str, port: int, conf: list[str], advanced: str,
                 tls: bool):
        super().__init__(base, f"wqs{port}", port, 20000 + port, conf, advanced, tcp=not tls)
        self.key = key
        self.tls = tls
        scheme = "amqps" if tls else "amqp"
        host = "localhost" if tls else "127.0.0.1"   # the server certificate names localhost
        self.url = f"{scheme}://guest:guest@{host}:{port}/%2F"

    def boot(self) -> "SpecialNode":
        t0 = time.monotonic()
        self.start()
        self.wait_started()
        self.boot_seconds = time.monotonic() - t0
        return self

    def set_watermark(self, fraction: float) -> None:
        """``set_vm_memory_high_watermark``: 0.0000001 raises the memory alarm, 0.4 clears it."""
        self.ctl("set_vm_memory_high_watermark", f"{fraction:.10f}".rstrip("0"))

    def alarms(self) -> list[str]:
        """Active alarms: ``['Memory alarm on node wqs5684@localhost']`` or ``[]``."""
        answer = self.json("rabbitmq-diagnostics", "alarms") or {}
        # With alarms the JSON has "local"/"global" lists, without them an empty "alarms".
        return [*answer.get("local", []), *answer.get("global", []), *answer.get("alarms", [])]

    def memory_alarm(self):
        """Context manager: memory alarm on while inside, restored to 0.4 in any case."""
        node = self

        class _Alarm:
            def __enter__(self):
                node.set_watermark(0.0000001)
                poll(node.alarms, 30, what=f"memory alarm on {node.node}")
                return node

            def __exit__(self, *exc):
                node.set_watermark(0.4)
                poll(lambda: not node.alarms(), 30, what=f"memory alarm cleared on {node.node}")
                return False
        return _Alarm()


class SpecialNodes:
    """Session-wide registry: one node per key, ports from 5684 up."""

    def __init__(self):
        self.base = _new_base("wqnodes.")
        self.nodes: dict[str, SpecialNode] = {}
        self._certs: Certs | None = None
        self._lock = threading.Lock()

    @property
    def certs(self) -> Certs:
        if self._certs is None:
            self._certs = Certs(self.base / "certs")
        return self._certs

    def __call__(self, key: str, conf: list[str] = (), advanced: str = "[].",
                 tls: str | None = None) -> SpecialNode:
        """The node for ``key``, booted on first use.

        ``tls``: None (plain AMQP), "server" (server certificate, client certificate
        optional but verified), "mutual" (client certificate required), "expired"
        (an expired server certificate).
        """
        with self._lock:
            if key in self.nodes:
                return self.nodes[key]
            used = {n.port for n in self.nodes.values()}
            free = [p for p in SPECIAL_PORTS if p not in used]
            assert free, f"no special-node port left in {SPECIAL_PORTS}"
            port = free[0]
            lines = ["loopback_users.guest = true", *conf]
            if tls:
                lines += self._tls_lines(port, tls)
            node = SpecialNode(self.base, key, port, lines, advanced, tls=bool(tls))
            self.nodes[key] = node
            node.boot()
            return node

    def _tls_lines(self, port: int, kind: str) -> list[str]:
        c = self.certs
        cert, key = ("expired.pem", "expired.key") if kind == "expired" else \
            ("server.pem", "server.key")
        return [
            "listeners.tcp = none",
            f"listeners.ssl.default = 127.0.0.1:{port}",
            f"ssl_options.cacertfile = {c.path('ca.pem')}",
            f"ssl_options.certfile = {c.path(cert)}",
            f"ssl_options.keyfile = {c.path(key)}",
            "ssl_options.verify = verify_peer",
            f"ssl_options.fail_if_no_peer_cert = {'true' if kind == 'mutual' else 'false'}",
        ]

    def teardown(self) -> None:
        nodes = list(self.nodes.values())
        pids = [n.pid() for n in nodes]
        _parallel(lambda n: n.shutdown(), nodes)
        survivors = [p for p in pids if p and pid_alive(p)]
        shutil.rmtree(self.base, ignore_errors=True)
        assert not survivors, f"special nodes survived teardown: pids {survivors}"


# --- fixtures -----------------------------------------------------------------

@pytest.fixture(scope="session")
def cluster():
    """The 3-node cluster for the whole session; torn down at its end whatever happened."""
    require_rabbitmq()
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.teardown()


@pytest.fixture
def healed_cluster(cluster):
    """The cluster for a destructive test: healthy before, healed and checked after."""
    if cluster.frozen or cluster.app_stopped or len(cluster.running()) < 3:
        cluster.heal()
    yield cluster
    cluster.heal()


# Consumer timeouts are evaluated on the channel's tick, once a minute by default;
# a 1 s tick makes a 5 s consumer_timeout fire after 5-6 s.
FAST_TICK = "[{rabbit, [{channel_tick_interval, 1000}]}]."


@pytest.fixture(scope="session")
def special_node():
    """Factory: ``special_node(key, conf=[...], advanced=..., tls=None|"server"|...)``."""
    require_rabbitmq()
    nodes = SpecialNodes()
    try:
        yield nodes
    finally:
        nodes.teardown()


@pytest.fixture(scope="session")
def tls_certs(special_node):
    return special_node.certs


@pytest.fixture(scope="session")
def plain_node(special_node):
    """A plain node to abuse (memory alarms, argument experiments), 1 s channel tick."""
    return special_node("plain", advanced=FAST_TICK)


@pytest.fixture(scope="session")
def timeout_node(special_node):
    """consumer_timeout = 5000 ms, evaluated every second."""
    return special_node("consumer_timeout", conf=["consumer_timeout = 5000"], advanced=FAST_TICK)


@pytest.fixture(scope="session")
def tls_node(special_node):
    """TLS only, server certificate for localhost/127.0.0.1; client certificates optional."""
    return special_node("tls", tls="server")


@pytest.fixture(scope="session")
def mtls_node(special_node):
    """TLS only; a client certificate from the test CA is required."""
    return special_node("mtls", tls="mutual")


@pytest.fixture(scope="session")
def expired_tls_node(special_node):
    """TLS only, serving a server certificate that expired in 2020."""
    return special_node("expired_tls", tls="expired")
