"""The configuration file, turned into frozen, validated objects.

Every value goes through a small converter that raises ``Invalid`` with what it
expected; ``load`` collects those with their key paths so the operator sees one
line per problem (``workqd.yaml: queues[0].workers: must be ...``) instead of a
traceback.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

DEFAULT_PATH = "/etc/workqd/workqd.yaml"
DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
# RabbitMQ's default consumer_timeout (3.10): a delivery unacked for longer is
# closed by the broker, so a task timeout at or above it cannot work.
BROKER_CONSUMER_TIMEOUT = 1800
MAX_TOTAL_WORKERS = 256
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


class Invalid(ValueError):
    """A value that a converter refused; the message says what was expected."""


class ConfigError(Exception):
    """The file cannot be used; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TLS:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class Broker:
    urls: tuple[str, ...] = (DEFAULT_URL,)
    password: str | None = None  # read from password_file, overrides the URL's
    heartbeat: int = 30
    tls: TLS = field(default_factory=TLS)


@dataclass(frozen=True)
class Handler:
    python: str | None = None            # "package.module:function"
    command: tuple[str, ...] | None = None  # argv, run without a shell


@dataclass(frozen=True)
class Retry:
    attempts: int = 3
    backoff: tuple[float, ...] = (5.0, 30.0)

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before try number ``attempt`` (2, 3, ...)."""
        if not self.backoff:
            return 0.0
        return self.backoff[min(attempt - 2, len(self.backoff) - 1)]


@dataclass(frozen=True)
class Queue:
    name: str
    handler: Handler
    type: str = "quorum"
    workers: int = 4
    prefetch: int = 1
    timeout: float = 600.0
    retry: Retry = field(default_factory=Retry)
    max_redeliveries: int = 3
    max_tasks_per_worker: int = 0
    max_memory_per_worker: int = 0  # bytes
    max_body: int = 16 * 1024 * 1024  # bytes

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.name}.dead"


@dataclass(frozen=True)
class Config:
    path: str
    broker: Broker
    queues: tuple[Queue, ...]
    metrics_listen: tuple[str, int] = ("127.0.0.1", 9464)
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    warnings: tuple[str, ...] = ()

    def queue(self, name: str) -> Queue:
        for q in self.queues:
            if q.name == name:
                return q
        raise KeyError(name)


# --- converters: value -> value, or raise Invalid -------------------------

def _show(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def whole(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise Invalid(f"must be a whole number >= {minimum}, got {_show(value)}")
        return value
    return convert


def seconds(minimum: float, allow_zero: bool = False) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and (value > minimum or (allow_zero and value == 0) or value == minimum):
            return float(value)
        raise Invalid(f"must be a number of seconds >= {minimum}, got {_show(value)}")
    return convert


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"must be a non-empty string, got {_show(value)}")
    return value


def choice(*options: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in options:
            raise Invalid(f"must be one of {', '.join(options)}, got {_show(value)}")
        return value
    return convert


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
          "KB": 1000, "MB": 10**6, "GB": 10**9, "k": 1 << 10, "K": 1 << 10,
          "M": 1 << 20, "G": 1 << 30}


def size(value: Any) -> int:
    """Bytes, from ``512MiB``, ``2GB`` or a plain number; 0 means no limit."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if not m:
        raise Invalid(f"must be a size such as 512MiB or 0, got {_show(value)}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def amqp_url(value: Any) -> str:
    url = text(value)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise Invalid(f"must be an amqp:// or amqps:// URL with a host, got {_show(value)}")
    return url


def listen_address(value: Any) -> tuple[str, int]:
    s = text(value)
    host, sep, port = s.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Invalid(f"must be HOST:PORT, e.g. 127.0.0.1:9464, got {_show(value)}")
    return host, int(port)


# --- structure -----------------------------------------------------------

class _Reader:
    """Walks the YAML mapping, converting values and collecting problems by key path."""

    def __init__(self, path: str):
        self.path = path
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(key, f"must be a mapping, got {_show(value)}")
            return {}
        for unknown in sorted(set(map(str, value)) - allowed):
            self.problem(f"{key}.{unknown}" if key else unknown,
                         f"unknown key (known: {', '.join(sorted(allowed))})")
        return value

    def get(self, data: dict, name: str, key: str, convert: Callable, default: Any) -> Any:
        if name not in data or data[name] is None and default is not None:
            return default
        try:
            return convert(data[name])
        except Invalid as e:
            self.problem(f"{key}.{name}" if key else name, str(e))
            return default


def _broker(r: _Reader, raw: Any) -> Broker:
    data = r.mapping(raw, "broker", {"url", "urls", "password_file", "heartbeat", "tls"})
    if "url" in data and "urls" in data:
        r.problem("broker", "give either url or urls, not both")
    urls: tuple[str, ...] = (DEFAULT_URL,)
    if "urls" in data:
        raw_urls = data["urls"]
        if not isinstance(raw_urls, list) or not raw_urls:
            r.problem("broker.urls", f"must be a non-empty list of URLs, got {_show(raw_urls)}")
        else:
            urls = tuple(_one_url(r, u, f"broker.urls[{i}]") for i, u in enumerate(raw_urls))
    elif "url" in data:
        urls = (r.get(data, "url", "broker", amqp_url, DEFAULT_URL),)
    password = None
    pw_file = r.get(data, "password_file", "broker", text, None)
    if not pw_file:
        for i, u in enumerate(urls):
            parts = urllib.parse.urlsplit(u)
            if parts.username and parts.password is None:
                key = f"broker.urls[{i}]" if "urls" in data else "broker.url"
                r.problem(key, "names a user but no password: add it, or set "
                          "broker.password_file")
    if pw_file:
        try:
            with open(pw_file, encoding="utf-8") as f:
                password = f.read().strip()
        except OSError as e:
            r.problem("broker.password_file", f"cannot read {pw_file}: {e.strerror}")
    tls_data = r.mapping(data.get("tls"), "broker.tls", {"ca_file", "cert_file", "key_file"})
    tls = TLS(**{k: r.get(tls_data, k, "broker.tls", text, None)
                 for k in ("ca_file", "cert_file", "key_file")})
    return Broker(urls=urls, password=password, tls=tls,
                  heartbeat=r.get(data, "heartbeat", "broker", whole(0), 30))


def _one_url(r: _Reader, value: Any, key: str) -> str:
    try:
        return amqp_url(value)
    except Invalid as e:
        r.problem(key, str(e))
        return DEFAULT_URL


def _handler(r: _Reader, raw: Any, key: str) -> Handler:
    data = r.mapping(raw, key, {"python", "command"})
    if ("python" in data) == ("command" in data):
        r.problem(key, "give exactly one of python: \"module:function\" or command: [argv...]")
        return Handler(python="workqd.handlers:sleep_dots")
    if "python" in data:
        ref = data["python"]
        if not isinstance(ref, str) or not re.fullmatch(r"[\w.]+:[\w.]+", ref):
            r.problem(f"{key}.python", f'must look like "package.module:function", got {_show(ref)}')
            return Handler(python="workqd.handlers:sleep_dots")
        return Handler(python=ref)
    argv = data["command"]
    if (not isinstance(argv, list) or not argv
            or not all(isinstance(a, str) and a for a in argv)):
        r.problem(f"{key}.command", f"must be a non-empty list of strings (argv), got {_show(argv)}")
        return Handler(command=("/bin/false",))
    if not argv[0].startswith("/"):
        r.problem(f"{key}.command", f"the program must be an absolute path (no shell, no PATH lookup), got {_show(argv[0])}")
    return Handler(command=tuple(argv))


def _retry(r: _Reader, raw: Any, key: str) -> Retry:
    data = r.mapping(raw, key, {"attempts", "backoff"})
    attempts = r.get(data, "attempts", key, whole(1), 3)
    backoff: tuple[float, ...] = (5.0, 30.0)
    if "backoff" in data:
        raw_b = data["backoff"]
        if isinstance(raw_b, (int, float)) and not isinstance(raw_b, bool):
            raw_b = [raw_b]
        if not isinstance(raw_b, list) or not raw_b:
            r.problem(f"{key}.backoff", f"must be a list of seconds, got {_show(raw_b)}")
        else:
            conv = seconds(0, allow_zero=True)
            try:
                backoff = tuple(conv(b) for b in raw_b)
            except Invalid as e:
                r.problem(f"{key}.backoff", str(e))
    return Retry(attempts=attempts, backoff=backoff)


_QUEUE_KEYS = {"name", "type", "workers", "prefetch", "handler", "timeout", "retry",
               "max_redeliveries", "max_tasks_per_worker", "max_memory_per_worker", "max_body"}


def _queue(r: _Reader, raw: Any, i: int) -> Queue | None:
    key = f"queues[{i}]"
    data = r.mapping(raw, key, _QUEUE_KEYS)
    if not isinstance(raw, dict):
        return None
    name = data.get("name")
    if not isinstance(name, str) or not QUEUE_NAME.match(name) or name.startswith("amq."):
        r.problem(f"{key}.name", f"must be a queue name (letters, digits, _ . : -; not amq.*), got {_show(name)}")
        name = f"invalid-{i}"
    if "handler" in data:
        handler = _handler(r, data["handler"], f"{key}.handler")
    else:
        r.problem(f"{key}.handler", "is required")
        handler = Handler(python="workqd.handlers:sleep_dots")
    return Queue(
        name=name,
        handler=handler,
        type=r.get(data, "type", key, choice("quorum", "classic"), "quorum"),
        workers=r.get(data, "workers", key, whole(1), 4),
        prefetch=r.get(data, "prefetch", key, whole(0), 1),
        timeout=r.get(data, "timeout", key, seconds(0.1), 600.0),
        retry=_retry(r, data.get("retry"), f"{key}.retry"),
        max_redeliveries=r.get(data, "max_redeliveries", key, whole(1), 3),
        max_tasks_per_worker=r.get(data, "max_tasks_per_worker", key, whole(0), 0),
        max_memory_per_worker=r.get(data, "max_memory_per_worker", key, size, 0),
        max_body=r.get(data, "max_body", key, size, 16 * 1024 * 1024),
    )


def parse(data: Any, path: str) -> Config:
    """Build a Config from already-parsed YAML; raises ConfigError listing every problem."""
    r = _Reader(path)
    top = r.mapping(data, "", {"broker", "metrics", "shutdown_timeout", "log", "queues"})
    if data is not None and not isinstance(data, dict):
        raise ConfigError(r.problems)
    broker = _broker(r, top.get("broker"))
    metrics = r.mapping(top.get("metrics"), "metrics", {"listen"})
    listen = r.get(metrics, "listen", "metrics", listen_address, ("127.0.0.1", 9464))
    log = r.mapping(top.get("log"), "log", {"level"})
    level = r.get(log, "level", "log", choice("debug", "info", "warning", "error"), "info")
    shutdown = r.get(top, "shutdown_timeout", "", seconds(0), 30.0)
    queues: list[Queue] = []
    raw_queues = top.get("queues")
    if not isinstance(raw_queues, list) or not raw_queues:
        r.problem("queues", f"must be a non-empty list of queues, got {_show(raw_queues)}")
    else:
        for i, raw in enumerate(raw_queues):
            q = _queue(r, raw, i)
            if q is not None:
                queues.append(q)
    names = [q.name for q in queues]
    for i, q in enumerate(queues):
        if names.index(q.name) != i:
            r.problem(f"queues[{i}].name", f'"{q.name}" is already used by queues[{names.index(q.name)}]')
    if sum(q.workers for q in queues) > MAX_TOTAL_WORKERS:
        r.problem("queues", f"at most {MAX_TOTAL_WORKERS} workers in all")
    if r.problems:
        raise ConfigError(r.problems)
    warnings = tuple(
        f"{path}: queues[{i}].timeout: {q.timeout:g}s is not below the broker's "
        f"consumer_timeout ({BROKER_CONSUMER_TIMEOUT}s by default): the broker will close the "
        f"channel of a task that runs that long"
        for i, q in enumerate(queues) if q.timeout >= BROKER_CONSUMER_TIMEOUT)
    return Config(path=path, broker=broker, queues=tuple(queues), metrics_listen=listen,
                  shutdown_timeout=shutdown, log_level=level, warnings=warnings)


def load(path: str) -> Config:
    """Read and validate the file at ``path``; raises ConfigError, never a traceback's worth."""
    try:
        with open(path, encoding="utf-8") as f:
            text_ = f.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        data = yaml.safe_load(text_)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"{path}: YAML syntax error: {where}{what}"]) from None
    return parse(data, path)
