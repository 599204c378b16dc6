"""The configuration file, turned into frozen, validated objects.

Every value goes through a small converter that raises ``Invalid`` with what it
expected; ``load`` collects those with their key paths so the operator sees one
line per problem (``workqd.yaml: queues[0].workers: must be ...``) instead of a
traceback. Whatever the file holds (a FIFO, an alias bomb, 600 levels of
nesting, a key written twice, ``.inf``), ``load`` raises nothing but
``ConfigError``. The dataclass defaults are the only place defaults are written:
a key that is absent (or null) is simply not passed to the constructor.
"""

from __future__ import annotations

import ast
import dataclasses
import ipaddress
import math
import os
import random
import re
import reprlib
import socket
import ssl
import stat
import sys
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from . import vocab, webauth

DEFAULT_PATH = "/etc/workqd/workqd.yaml"
DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
# RabbitMQ's default consumer_timeout (3.10): a delivery unacked for longer is
# closed by the broker, so a task timeout at or above it cannot work.
BROKER_CONSUMER_TIMEOUT = 1800
MAX_TOTAL_WORKERS = 256

# Files: read only regular files, and only this much of them.
MAX_CONFIG_BYTES = 1 << 20
MAX_SECRET_BYTES = 64 << 10
# YAML: a workqd config has a few hundred values; these stop alias bombs and
# deep nesting long before they cost memory, CPU or Python's recursion limit.
MAX_DEPTH = 64
MAX_NODES = 20_000        # values written in the file
MAX_VALUES = 50_000       # values after expanding aliases
MAX_NUMBER_CHARS = 64     # int("9" * 5000) raises; "1:2:3:..." is quadratic
# Numbers the broker, pika or Python's clocks would refuse.
U16 = 65535               # AMQP "short": prefetch_count, heartbeat, port
MAX_SECONDS = 365 * 86400  # task timeout, shutdown_timeout (threading waits overflow far above)
MAX_BACKOFF = 4294967.295  # x-message-ttl is at most 2^32-1 milliseconds
MAX_ATTEMPTS = 100
MAX_DEFERRALS = 1000
MAX_DELAY_QUEUES = 32      # per queue: each is a queue on the broker (quorum: a Raft group)
DEFAULT_JITTER = 0.5       # backoff: {initial, max}: up to half of each delay is random
MAX_REDELIVERIES = 1000
MAX_TASKS_PER_WORKER = 10**9
MAX_MEMORY = 1 << 40
MAX_BODY = 512 << 20      # RabbitMQ's hard limit for max_message_size
MAX_NAME_BYTES = 255      # queue names and vhosts are AMQP short strings
# URL query options pika.URLParameters knows (its _set_url_* methods) minus
# ssl_options: TLS comes from broker.tls, which connection_parameters applies.
URL_OPTIONS = ("blocked_connection_timeout", "channel_max", "client_properties",
               "connection_attempts", "frame_max", "heartbeat", "locale", "retry_delay",
               "socket_timeout", "stack_timeout", "tcp_options")
# ... and the ones broker.connection_parameters sets itself, so the URL's value is lost.
URL_OPTIONS_OVERRIDDEN = {
    "heartbeat": "use broker.heartbeat", "connection_attempts": "workqd retries itself",
    "socket_timeout": "workqd uses 5s", "stack_timeout": "workqd uses 10s",
    "blocked_connection_timeout": "workqd uses 60s", "client_properties": "workqd names its connections",
}


class Invalid(ValueError):
    """A value that a converter refused; the message says what was expected."""


class ConfigError(Exception):
    """The file cannot be used; ``problems`` holds one line each, control characters escaped."""

    def __init__(self, problems: list[str]):
        self.problems = [escape(line) for line in problems]
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class TLS:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class Broker:
    urls: tuple[str, ...] = (DEFAULT_URL,)
    password: str | None = None  # read from password_file, overrides the URL's
    password_file: str | None = None  # read again at every connect, so a rotated secret applies
    heartbeat: int = 30
    tls: TLS = field(default_factory=TLS)


@dataclass(frozen=True)
class Handler:
    python: str | None = None            # "package.module:function"
    command: tuple[str, ...] | None = None  # argv, run without a shell
    environment: tuple[tuple[str, str], ...] = ()  # (name, value) set for the handler
    working_directory: str | None = None
    python_path: tuple[str, ...] = ()    # directories put in front of sys.path (Python only)
    virtualenv: str | None = None        # a venv whose site-packages the worker adds (Python only)


@dataclass(frozen=True)
class Retry:
    attempts: int = 3
    backoff: tuple[float, ...] = (5.0, 30.0)   # before try 2, 3, ...; the last repeats
    # A fraction of each delay that is random (``backoff: {initial, max, jitter}``), so
    # tasks failed by one outage come back spread out, not in the same second. Each
    # delay has a queue with a fixed TTL, so the random part takes one of JITTER_STEPS
    # values, each with its own delay queue.
    jitter: float = 0.0
    # Deferrals (RetryLater, exit 75) one task may have before it counts as failed.
    max_deferrals: int = 10

    def delay_before(self, attempt: int, pick: float | None = None) -> float:
        """Seconds to wait before try number ``attempt`` (2, 3, ...); ``pick`` in [0, 1)
        chooses the jitter step (random when None)."""
        if not self.backoff:
            return 0.0
        steps = self._steps(self.backoff[min(attempt - 2, len(self.backoff) - 1)])
        if len(steps) == 1:
            return steps[0]
        return steps[int((random.random() if pick is None else pick) * len(steps))
                     % len(steps)]

    def delays(self) -> list[float]:
        """Every delay a retry (or a deferral) of this queue can wait, each with its own
        delay queue: try N waits delay_before(N); a deferral of try N waits the delay of
        try N + 1, so with deferrals on the last try's delay is one further."""
        used = self.backoff[:max(0, self.attempts - 1 + (1 if self.max_deferrals else 0))]
        return sorted({d for b in used for d in self._steps(b) if d > 0})

    def _steps(self, base: float) -> tuple[float, ...]:
        if not self.jitter or base == 0:
            return (base,)
        low = base * (1 - self.jitter)
        return tuple(sorted({jitter_step(low + (base - low) * k / (JITTER_STEPS - 1))
                             for k in range(JITTER_STEPS)}))


JITTER_STEPS = 4


def jitter_step(seconds: float) -> float:
    """Round a jittered delay to two significant digits (at least 1 ms), so that
    nearby values share one delay queue and names stay short."""
    return max(0.001, float(f"{seconds:.2g}"))


@dataclass(frozen=True)
class Autoscale:
    """``workers: {min: 2, max: 16, idle_after: 30}``: the pool moves between min and max."""
    min: int
    max: int
    idle_after: float = 30.0   # seconds a worker stays idle before the pool shrinks by one


@dataclass(frozen=True)
class Binding:
    exchange: str
    routing_key: str = ""


@dataclass(frozen=True)
class Queue:
    name: str
    handler: Handler
    type: str = "quorum"
    workers: int = 4
    prefetch: int = 1
    timeout: float = 600.0
    timeout_grace: float = 5.0   # seconds between SIGTERM and SIGKILL of a timed-out command
    retry: Retry = field(default_factory=Retry)
    max_redeliveries: int = 3
    max_tasks_per_worker: int = 0
    max_memory_per_worker: int = 0  # bytes
    max_body: int = 16 * 1024 * 1024  # bytes
    # Seconds a worker may spend loading its Python handler (imports) before the
    # master calls it hung; the liveness clock only starts once the import is done.
    import_timeout: float = 120.0
    # False: outcomes go only to direct reply-to (amq.rabbitmq.reply-to.*); a named
    # reply queue is a publisher aiming workqd's credentials, so it is a trust decision.
    allow_reply_queues: bool = False
    # Not a key of its own: read from ``workers: {min, max}`` (then ``workers`` is its min).
    autoscale: Autoscale | None = field(default=None, metadata={"key": "workers"})
    declare: bool = True              # False: the queue is someone else's, checked passively
    declare_side_queues: bool = True  # False: no .dead/.delay queues, so no retries
    arguments: tuple[tuple[str, Any], ...] = ()  # extra x-arguments for the declare
    bindings: tuple[Binding, ...] = ()

    @property
    def most_workers(self) -> int:
        return self.autoscale.max if self.autoscale else self.workers

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.name}.dead"

    @property
    def idle_consumers_expected(self) -> bool:
        """Consumers of this queue may sit idle while tasks wait: a single active consumer
        queue, or one declared by others (it may be one). Then idle is no sign of a fault."""
        return not self.declare or bool(dict(self.arguments).get("x-single-active-consumer"))


@dataclass(frozen=True)
class MetricsTLS:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # set: clients must present a certificate it signed


@dataclass(frozen=True)
class Config:
    path: str
    broker: Broker
    queues: tuple[Queue, ...]
    metrics_listen: tuple[str, int] = ("127.0.0.1", 9464)
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    log_format: str = "text"    # text | json (logsetup.py)
    warnings: tuple[str, ...] = ()
    metrics_tls: MetricsTLS | None = None
    metrics_basic_auth: tuple[tuple[str, str], ...] = ()  # (user, webauth hash line); () = open
    control_socket: str | None = None   # None: control.server_path() picks it

    def queue(self, name: str) -> Queue:
        for q in self.queues:
            if q.name == name:
                return q
        raise KeyError(name)


# --- showing values from the file: escaped, shortened, passwords hidden ----

def escape(text: str) -> str:
    """``text`` with every unprintable character written as a Python escape (\\n, \\x1b)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``, also when the URL is malformed."""
    try:
        netloc = urllib.parse.urlsplit(url).netloc
    except ValueError:
        netloc = ""
    if "@" in netloc and ":" in netloc.rpartition("@")[0]:
        return url.replace(netloc, f"{netloc.partition(':')[0]}:***@{netloc.rpartition('@')[2]}", 1)
    # Malformed (or a password with an unescaped / ? #): everything between the
    # user and the last @ goes, even if that hides more than the password.
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{host}"


# A safety net for lines that quote a URL-like string outside the broker section.
_SECRET = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):\S*@")


class _Repr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<a {x.bit_length()}-bit number>"
        return repr(x)


_REPR = _Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value if len(value) <= 80 else value[:77] + "..."}"'
    if value is None:
        return "null"
    return _REPR.repr(value)


def _show_url(value: Any) -> str:
    if isinstance(value, str):
        return _show(redact(value))
    if isinstance(value, list):
        return _show([redact(v) if isinstance(v, str) else v for v in value])
    return _show(value)


# --- converters: value -> value, or raise Invalid -------------------------

def _number(x: float) -> str:
    """4294967.295 and 31536000, not 4.29497e+06 and 3.1536e+07."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def whole(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise Invalid(f"must be a whole number >= {minimum}, got {_show(value)}")
        if maximum is not None and value > maximum:
            raise Invalid(f"must be at most {maximum}, got {_show(value)}")
        return value
    return convert


def seconds(minimum: float, maximum: float = MAX_SECONDS,
            allow_zero: bool = False) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if _is_number(value) and isinstance(value, float) and not math.isfinite(value):
            raise Invalid(f"must be a finite number of seconds, got {_show(value)}")
        if not _is_number(value) or not (value >= minimum or (allow_zero and value == 0)):
            raise Invalid(f"must be a number of seconds >= {_number(minimum)}, got {_show(value)}")
        if value > maximum:
            raise Invalid(f"must be at most {_number(maximum)} seconds, got {_show(value)}")
        return float(value)
    return convert


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"must be a non-empty string, got {_show(value)}")
    return value


def path_text(value: Any) -> str:
    """A file name: a non-empty string without control characters."""
    value = text(value)
    if not value.isprintable():
        raise Invalid(f"must be a file name without control characters, got {_show(value)}")
    return value


def choice(*options: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise Invalid(f"must be one of {', '.join(options)}, got {_show(value)}")
        return value
    return convert


_SIZE = re.compile(r"\s*([0-9]{1,20})\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*", re.ASCII)
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
          "KB": 1000, "MB": 10**6, "GB": 10**9, "k": 1 << 10, "K": 1 << 10,
          "M": 1 << 20, "G": 1 << 30}


def _size_text(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def size(value: Any, minimum: int = 0, maximum: int = MAX_MEMORY) -> int:
    """Bytes, from ``512MiB``, ``2GB`` or a plain number."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        n = value
    else:
        m = _SIZE.fullmatch(value) if isinstance(value, str) else None
        if not m:
            raise Invalid(f"must be a size such as 512MiB or 0, got {_show(value)}")
        n = int(m.group(1)) * _UNITS[m.group(2)]
    if n < minimum:
        raise Invalid(f"must be at least {_size_text(minimum)}, got {_show(value)}")
    if n > maximum:
        raise Invalid(f"must be at most {_size_text(maximum)}, got {_show(value)}")
    return n


def sizes(minimum: int, maximum: int) -> Callable[[Any], int]:
    return lambda value: size(value, minimum, maximum)


def queue_name(value: Any) -> str:
    """A RabbitMQ queue name workqd can also log: no spaces, no control characters."""
    if (not isinstance(value, str) or not value or value.startswith("amq.")
            or any(not c.isprintable() or c.isspace() for c in value)
            or len(value.encode("utf-8")) > MAX_NAME_BYTES - len(".dead")):
        raise Invalid(f"must be a queue name: 1 to {MAX_NAME_BYTES - len('.dead')} bytes of "
                      f"UTF-8 without spaces or control characters, not starting with amq., "
                      f"got {_show(value)}")
    return value


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)", re.ASCII)


def host_name(host: str) -> str:
    """An IP address or a DNS name (IPv6 without brackets); Invalid otherwise."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if (len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels)
            or all(label.isdigit() for label in labels)):  # "1.2.3": inet_aton would guess
        raise Invalid(f"must be an IP address or a host name, got {_show(host)}")
    return host


def _port(text_: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text_, re.ASCII) or not 0 < int(text_) <= U16:
        raise Invalid(f"the port must be a number from 1 to {U16}, got {_show(text_)}")
    return int(text_)


def _split_host_port(hostport: str) -> tuple[str, str | None]:
    """("host", "port" or None) of ``host[:port]`` or ``[v6][:port]``."""
    if hostport.startswith("["):
        inside, bracket, after = hostport[1:].partition("]")
        if not bracket or after and not after.startswith(":"):
            raise Invalid(f"an IPv6 address must be written [ADDRESS]:PORT, got {_show(hostport)}")
        if ":" not in inside:
            raise Invalid(f"brackets are for IPv6 addresses, got {_show(hostport)}")
        return inside, after[1:] if after else None
    host, colon, port = hostport.rpartition(":")
    if not colon:
        return hostport, None
    if ":" in host:
        raise Invalid(f"write an IPv6 address in brackets, e.g. [::1]:9464, got {_show(hostport)}")
    return host, port


def _unquote(part: str, what: str) -> str:
    try:
        value = urllib.parse.unquote(part, errors="strict")
    except UnicodeDecodeError:
        raise Invalid(f"the {what} is not UTF-8 after %-decoding") from None
    if not value.isprintable():
        raise Invalid(f"the {what} holds control characters")
    return value


def amqp_url(value: Any) -> str:
    """An amqp:// or amqps:// URL that pika accepts: host, port, vhost and query checked."""
    url = text(value)
    shown = _show_url(url)
    if any(not c.isprintable() or c.isspace() for c in url):
        raise Invalid(f"must be a URL without spaces or control characters, got {shown}")
    scheme, sep, rest = url.partition("://")
    if scheme not in ("amqp", "amqps") or not sep:
        raise Invalid(f"must be an amqp:// or amqps:// URL, got {shown}")
    userinfo, at, rest = rest.rpartition("@")
    if at and any(c in userinfo for c in "/?#"):
        raise Invalid(f"the user name or password holds / ? # or @: write them %-encoded "
                      f"(%2F %3F %23 %40), in {shown}")
    if "#" in rest:
        raise Invalid(f"must not have a #fragment, got {shown}")
    netloc, _, path_query = rest.partition("/")
    if "?" in netloc:
        netloc, _, query = netloc.partition("?")
        path = ""
    else:
        path, _, query = path_query.partition("?")
    try:
        if at:
            user, _, password = userinfo.partition(":")
            if not _unquote(user, "user name"):
                raise Invalid("the user name is empty")
            _unquote(password, "password")
        host, port = _split_host_port(netloc)
        if not host:
            raise Invalid("there is no host")
        host_name(host)
        if port is not None:
            _port(port)
        if "/" in path:
            raise Invalid("the vhost must be one path segment (write / as %2F)")
        if len(_unquote(path, "vhost").encode("utf-8")) > MAX_NAME_BYTES:
            raise Invalid(f"the vhost is longer than {MAX_NAME_BYTES} bytes")
        if query:
            _check_query(url, query)
    except Invalid as e:
        raise Invalid(f"{e}, in {shown}") from None
    return url


def _check_query(url: str, query: str) -> None:
    """Each option known to pika, given once, with a value pika takes."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True,
                                       errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise Invalid("the query string is malformed (want name=value&name=value)") from None
    names = [name for name, _ in pairs]
    for name, value in pairs:
        if name == "ssl_options":
            raise Invalid("ssl_options is not used: set broker.tls and use amqps://")
        if name not in URL_OPTIONS:
            raise Invalid(f"unknown query option {_show(name)} (known: {', '.join(URL_OPTIONS)})")
        if names.count(name) > 1:
            raise Invalid(f"query option {name} is given twice")
        if name in ("heartbeat", "channel_max", "frame_max", "connection_attempts"):
            if not re.fullmatch(r"[0-9]{1,9}", value, re.ASCII):
                raise Invalid(f"query option {name} must be a whole number, got {_show(value)}")
        elif name not in ("locale", "client_properties", "tcp_options"):
            try:
                finite = math.isfinite(float(value))
            except ValueError:
                finite = False
            if not finite:
                raise Invalid(f"query option {name} must be a finite number, got {_show(value)}")
        elif name != "locale":
            try:
                literal = ast.literal_eval(value)
            except Exception:  # SyntaxError, ValueError, MemoryError, RecursionError: all "no"
                literal = None
            if not isinstance(literal, dict):
                raise Invalid(f"query option {name} must be a Python dict literal, got {_show(value)}")
        if name == "heartbeat" and int(value) > U16:
            raise Invalid(f"query option heartbeat must be at most {U16}, got {value}")
    # pika's own checks (frame_max and channel_max ranges, positive timeouts, ...),
    # on the URL without its user and password, as broker.connection_parameters does.
    import pika  # only needed for URLs with options; --check stays quick without
    parts = urllib.parse.urlsplit(url)
    try:
        pika.URLParameters(urllib.parse.urlunsplit(
            parts._replace(netloc=parts.netloc.rpartition("@")[2])))
    except Exception as e:  # whatever pika raises for a value it refuses
        raise Invalid(f"pika refuses the query: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def url_warnings(url: str) -> list[str]:
    """Query options that parse but that broker.connection_parameters replaces."""
    try:
        query = urllib.parse.urlsplit(url).query
        names = [name for name, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)]
    except ValueError:
        return []
    return [f"query option {name} has no effect ({URL_OPTIONS_OVERRIDDEN[name]})"
            for name in names if name in URL_OPTIONS_OVERRIDDEN]


def listen_address(value: Any) -> tuple[str, int]:
    s = text(value)
    try:
        host, port = _split_host_port(s)
        if not host or port is None:
            raise Invalid(f"got {_show(value)}")
        host_name(host)
        return host, _port(port)
    except Invalid as e:
        raise Invalid(f"must be HOST:PORT (e.g. 127.0.0.1:9464 or [::1]:9464): {e}") from None


def python_ref(value: Any) -> str:
    """``package.module:function``, each part a Python identifier."""
    module, colon, func = value.partition(":") if isinstance(value, str) else ("", "", "")
    parts = module.split(".") + func.split(".")
    if not colon or not all(p.isidentifier() for p in parts):
        raise Invalid(f'must look like "package.module:function", got {_show(value)}')
    return value


# --- files: only regular ones, only so many bytes, never blocking ----------

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _open_regular(path: str, name: str) -> tuple[int, os.stat_result]:
    """An fd on the regular file ``path``; ``name`` prefixes messages ("" for the config itself)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOCTTY: a
        # terminal device must not become ours. Both are no-ops on regular files.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Invalid(f"cannot read {name}: No such file or directory" if name else "no such file") from None
    except OSError as e:
        raise Invalid(f"cannot read{' ' + name if name else ''}: {e.strerror}") from None
    except ValueError:  # a NUL byte in the name
        raise Invalid(f"cannot read{' ' + name if name else ''}: the name holds a NUL byte") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a file")
        raise Invalid(f"{name + ' ' if name else ''}is {kind}, not a regular file")
    return fd, st


def _read_regular(path: str, limit: int, name: str) -> tuple[bytes, os.stat_result]:
    fd, st = _open_regular(path, name)
    try:
        chunks, total = [], 0
        while total <= limit:  # st_size may lie (procfs) or grow: count what is read
            chunk = os.read(fd, min(1 << 16, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as e:
        raise Invalid(f"cannot read{' ' + name if name else ''}: {e.strerror}") from None
    finally:
        os.close(fd)
    if total > limit:
        raise Invalid(f"{name + ' ' if name else ''}is larger than {_size_text(limit)}, "
                      f"the limit for this file")
    return b"".join(chunks), st


def _check_readable(path: str) -> os.stat_result:
    fd, st = _open_regular(path, path)
    os.close(fd)
    return st


def _no_passphrase() -> bytes:
    raise Invalid("the key is encrypted; workqd needs a key without a passphrase")


def _load_tls(make: Callable[[], ssl.SSLContext], cert: str | None, key: str | None,
              ca: str | None) -> str | None:
    """Why ssl cannot use these files, or None."""
    try:
        ctx = make()
        if ca:
            try:
                ctx.load_verify_locations(cafile=ca)
            except ssl.SSLError as e:
                return f"{ca} holds no usable CA certificate ({e.reason or e})"
        if cert:
            ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except Invalid as e:
        return str(e)
    except (ssl.SSLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        return f"cannot load the certificate {cert} and key {key or cert} ({reason})"
    return None


# --- YAML with limits -----------------------------------------------------

class _Refused(Exception):
    """The document breaks a limit; raised while composing or inspecting nodes."""

    def __init__(self, where: tuple, message: str, mark: Any):
        super().__init__(message)
        self.where, self.message, self.line = where, message, mark.line + 1 if mark else None


def _component(index: Any) -> Any:
    if isinstance(index, ScalarNode):
        return index.value
    return index if index is None or isinstance(index, (int, str)) else "?"


def _key_path(where: tuple) -> str:
    parts = [p for p in where if p is not None]
    out = ""
    for p in parts[:4]:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out + ("..." if len(parts) > 4 else "")


class _LimitedComposer(Composer):
    """PyYAML's composer with a node count and a depth limit, checked as events arrive."""

    def __init__(self) -> None:
        super().__init__()
        self._where: list = []
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        mark = self.peek_event().start_mark
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(tuple(self._where), f"more than {MAX_NODES} values", mark)
        self._where.append(_component(index))
        try:
            if len(self._where) > MAX_DEPTH:
                raise _Refused(tuple(self._where), f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._where.pop()


try:  # libyaml scans and parses in C; only composing (with limits) is Python
    from yaml.cyaml import CParser as _Parser

    class _Loader(_LimitedComposer, _Parser, SafeConstructor, Resolver):
        def __init__(self, stream: str) -> None:
            _Parser.__init__(self, stream)
            _LimitedComposer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
except ImportError:  # PyYAML without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Loader(_LimitedComposer, Reader, Scanner, Parser, SafeConstructor, Resolver):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)
            _LimitedComposer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

_NUMBER_TAGS = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _twice(a: Any, b: Any) -> str:
    (la, ca), (lb, cb) = ((n.start_mark.line + 1, n.start_mark.column + 1) for n in (a, b))
    return f"given twice (lines {la} and {lb})" if la != lb else f"given twice (line {la}, columns {ca} and {cb})"


def _inspect(root: Any) -> list[tuple[tuple, str]]:
    """Duplicate keys as (where, message); raises _Refused for expansion, cycles, long numbers."""
    duplicates: list[tuple[tuple, str]] = []
    checked: set[int] = set()
    on_path: set[int] = set()
    visits = 0

    def walk(node: Any, where: tuple) -> None:
        nonlocal visits
        visits += 1
        if visits > MAX_VALUES:
            raise _Refused(where, f"aliases expand to more than {MAX_VALUES} values", node.start_mark)
        if len(where) > MAX_DEPTH:
            raise _Refused(where, f"nested deeper than {MAX_DEPTH} levels (through aliases)",
                           node.start_mark)
        if isinstance(node, ScalarNode):
            if node.tag in _NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
                raise _Refused(where, f"a number of {len(node.value)} characters", node.start_mark)
            return
        if id(node) in on_path:
            raise _Refused(where, "an alias refers to a value that contains it", node.start_mark)
        on_path.add(id(node))
        if isinstance(node, SequenceNode):
            for i, child in enumerate(node.value):
                walk(child, where + (i,))
        elif isinstance(node, MappingNode):
            first_look = id(node) not in checked
            checked.add(id(node))
            seen: dict[tuple, Any] = {}
            for key, value in node.value:
                walk(key, where + ("?",))
                if isinstance(key, ScalarNode) and key.tag != _MERGE_TAG:
                    first = seen.setdefault((key.tag, key.value), key)
                    if first_look and first is not key:
                        duplicates.append((where + (key.value,), _twice(first, key)))
                walk(value, where + (_component(key),))
        on_path.discard(id(node))

    if root is not None:
        walk(root, ())
    return duplicates


def _parse_yaml(source: str, path: str) -> Any:
    loader = None
    try:
        loader = _Loader(source)
        root = loader.get_single_node()
        duplicates = _inspect(root)
        if duplicates:
            raise ConfigError([f"{path}: {_key_path(where)}: {message}" for where, message in duplicates])
        return None if root is None else loader.construct_document(root)
    except _Refused as e:
        where = _key_path(e.where)
        line = f" (line {e.line})" if e.line else ""
        raise ConfigError([f"{path}: {where + ': ' if where else ''}{e.message}{line}"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(e, "problem", None) or (str(e).splitlines() or ["?"])[0]
        raise ConfigError([f"{path}: YAML syntax error: {where}{what}"]) from None
    except ConfigError:
        raise
    except Exception as e:
        # PyYAML's constructors raise ValueError, IndexError, AttributeError... for
        # values such as 2024-02-30, !!timestamp x or !!int "": all mean a bad value.
        raise ConfigError([f"{path}: YAML value error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"]) from None
    finally:
        if loader is not None:
            loader.dispose()


# --- structure -----------------------------------------------------------

class _Reader:
    """Walks the YAML mapping, converting values and collecting problems by key path."""

    def __init__(self, path: str):
        self.path = path
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def _line(self, key: str, message: str) -> str:
        line = f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}"
        return _SECRET.sub(r"\1:***@", line)

    def problem(self, key: str, message: str) -> None:
        self.problems.append(self._line(key, message))

    def warning(self, key: str, message: str) -> None:
        self.warnings.append(escape(self._line(key, message)))

    def mapping(self, value: Any, key: str, allowed: set[str] | None) -> dict:
        """``value`` as a dict (None: empty); keys outside ``allowed`` are problems."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(key, f"must be a mapping, got {_show(value)}")
            return {}
        if allowed is not None:
            for unknown in sorted(_show(k) if not isinstance(k, str) else k
                                  for k in value if k not in allowed):
                self.problem(f"{key}.{unknown}" if key else unknown,
                             f"unknown key (known: {', '.join(sorted(allowed))})")
        return value

    def fields(self, data: dict, key: str, converters: dict[str, Callable]) -> dict:
        """Converted values of the keys that are present and not null; the dataclass
        supplies the default for the others."""
        out = {}
        for name, convert in converters.items():
            if data.get(name) is None:
                continue
            try:
                out[name] = convert(data[name])
            except Invalid as e:
                self.problem(f"{key}.{name}" if key else name, str(e))
        return out


_PERMISSIONS = "chmod 640 {f} && chown root:workqd {f}"


def _broker(r: _Reader, raw: Any, file_mode: int | None) -> Broker:
    data = r.mapping(raw, "broker", {"url", "urls", "password_file", "heartbeat", "tls"})
    if data.get("url") is not None and data.get("urls") is not None:
        r.problem("broker", "give either url or urls, not both")
    kwargs: dict[str, Any] = {}
    keyed: list[tuple[str, str]] = []  # (key path, url)
    if data.get("urls") is not None:
        raw_urls = data["urls"]
        if not isinstance(raw_urls, list) or not raw_urls:
            r.problem("broker.urls", f"must be a non-empty list of URLs, got {_show_url(raw_urls)}")
        else:
            for i, u in enumerate(raw_urls):
                try:
                    keyed.append((f"broker.urls[{i}]", amqp_url(u)))
                except Invalid as e:
                    r.problem(f"broker.urls[{i}]", str(e))
    elif data.get("url") is not None:
        try:
            keyed.append(("broker.url", amqp_url(data["url"])))
        except Invalid as e:
            r.problem("broker.url", str(e))
    if keyed:
        kwargs["urls"] = tuple(u for _, u in keyed)
    kwargs.update(r.fields(data, "broker", {"heartbeat": whole(0, U16)}))
    pw_file, pw_stat = None, None
    if data.get("password_file") is not None:
        try:
            pw_file = path_text(data["password_file"])
            kwargs["password"], pw_stat = _read_password(pw_file)
            kwargs["password_file"] = pw_file
        except Invalid as e:
            r.problem("broker.password_file", str(e))
    for key, u in keyed:
        for warning in url_warnings(u):
            r.warning(key, warning)
        parts = urllib.parse.urlsplit(u)
        if parts.username and parts.password is None and data.get("password_file") is None:
            r.problem(key, "names a user but no password: add it, or set broker.password_file")
        elif parts.password is not None and pw_file:
            r.warning(key, "the password in the URL is not used: broker.password_file overrides it")
        elif (parts.password is not None and file_mode is not None and file_mode & stat.S_IROTH
              and (parts.username, parts.password) != ("guest", "guest")):
            r.warning(key, f"holds a password and {r.path} is readable by every local user "
                      f"(mode {stat.S_IMODE(file_mode):04o}): {_PERMISSIONS.format(f=r.path)}, "
                      f"or move the password to broker.password_file")
    if pw_stat is not None and pw_stat.st_mode & stat.S_IROTH:
        r.warning("broker.password_file", f"{pw_file} is readable by every local user (mode "
                  f"{stat.S_IMODE(pw_stat.st_mode):04o}): {_PERMISSIONS.format(f=pw_file)} "
                  f"(or chmod 600 with owner workqd)")
    kwargs["tls"] = _broker_tls(r, data.get("tls"))
    if kwargs["tls"] != TLS() and not any(u.startswith("amqps://") for _, u in keyed):
        r.warning("broker.tls", "is not used: no broker URL is amqps://")
    return Broker(**kwargs)


def read_password(pw_file: str) -> str:
    """The secret in ``pw_file`` now; raises Invalid (with the reason) when it cannot be used."""
    return _read_password(pw_file)[0]


def _read_password(pw_file: str) -> tuple[str, os.stat_result]:
    raw, st = _read_regular(pw_file, MAX_SECRET_BYTES, pw_file)
    try:
        password = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Invalid(f"{pw_file} is not UTF-8 text") from None
    if not password:
        raise Invalid(f"{pw_file} is empty")
    if not password.isprintable():
        raise Invalid(f"{pw_file} holds more than one line or control characters; "
                      f"write the password alone on one line")
    return password, st


def _tls_files(r: _Reader, data: dict, key: str, names: tuple[str, ...]) -> dict[str, str]:
    """The named files that are set, each a readable regular file (else a problem)."""
    out = {}
    for name in names:
        if data.get(name) is None:
            continue
        try:
            out[name] = path_text(data[name])
            _check_readable(out[name])
        except Invalid as e:
            r.problem(f"{key}.{name}", str(e))
            out[name] = ""
    return out


def _broker_tls(r: _Reader, raw: Any) -> TLS:
    data = r.mapping(raw, "broker.tls", {"ca_file", "cert_file", "key_file"})
    files = _tls_files(r, data, "broker.tls", ("ca_file", "cert_file", "key_file"))
    if "key_file" in files and "cert_file" not in files:
        r.problem("broker.tls.key_file", "needs cert_file (the client certificate)")
    elif all(files.values()) and files:
        why = _load_tls(ssl.create_default_context, files.get("cert_file"),
                        files.get("key_file"), files.get("ca_file"))
        if why:
            r.problem("broker.tls", why)
    return TLS(**{k: v for k, v in files.items() if v})


def _metrics(r: _Reader, raw: Any) -> dict[str, Any]:
    data = r.mapping(raw, "metrics", {"listen", "tls", "basic_auth"})
    out = {f"metrics_{k}": v for k, v in r.fields(data, "metrics", {"listen": listen_address}).items()}
    tls = r.mapping(data.get("tls"), "metrics.tls", {"cert_file", "key_file", "client_ca_file"})
    files = _tls_files(r, tls, "metrics.tls", ("cert_file", "key_file", "client_ca_file"))
    if files and ("cert_file" not in files or "key_file" not in files):
        r.problem("metrics.tls", "needs both cert_file and key_file")
    elif files and all(files.values()):
        why = _load_tls(lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files["cert_file"],
                        files["key_file"], files.get("client_ca_file"))
        if why:
            r.problem("metrics.tls", why)
        out["metrics_tls"] = MetricsTLS(**files)
    users = r.mapping(data.get("basic_auth"), "metrics.basic_auth", None)
    auth = []
    for user, line in users.items():
        key = f"metrics.basic_auth.{user if isinstance(user, str) and user else _show(user)}"
        if (not isinstance(user, str) or not user or ":" in user
                or any(not c.isprintable() for c in user)):
            r.problem(key, "a user name must be a non-empty string without : or control characters")
        else:
            try:
                webauth.parse_hash(line)
                auth.append((user, line))
            except ValueError as e:
                r.problem(key, str(e))
    if auth:
        out["metrics_basic_auth"] = tuple(auth)
    return out


# sun_path is 108 bytes on Linux, with its terminating NUL.
MAX_SOCKET_PATH = 107


def _control(r: _Reader, raw: Any) -> dict[str, Any]:
    """control.socket: the workqctl socket's path (absolute, short enough for AF_UNIX)."""
    data = r.mapping(raw, "control", {"socket"})
    out = {f"control_{k}": v for k, v in r.fields(data, "control", {"socket": path_text}).items()}
    path = out.get("control_socket")
    if path is not None:
        if not path.startswith("/"):
            r.problem("control.socket", f"must be an absolute path, got {_show(path)}")
        elif len(path.encode()) > MAX_SOCKET_PATH:
            r.problem("control.socket", f"at most {MAX_SOCKET_PATH} bytes (a Unix socket path), "
                      f"got {len(path.encode())}")
    return out


_HANDLER_SETTINGS = {"environment", "working_directory", "python_path", "virtualenv"}


def _handler(r: _Reader, raw: Any, key: str) -> Handler:
    handler = _handler_program(r, raw, key)
    data = raw if isinstance(raw, dict) else {}
    settings = _handler_settings(r, data, key, python=handler.python is not None)
    return dataclasses.replace(handler, **settings) if settings else handler


def _handler_program(r: _Reader, raw: Any, key: str) -> Handler:
    data = r.mapping(raw, key, {"python", "command", *_HANDLER_SETTINGS})
    if not isinstance(raw, dict):
        if raw is None:
            r.problem(key, "is required")
        return Handler(python="workqd.handlers:sleep_dots")
    if ("python" in data) == ("command" in data):
        r.problem(key, "give exactly one of python: \"module:function\" or command: [argv...]")
        return Handler(python="workqd.handlers:sleep_dots")
    if "python" in data:
        try:
            return Handler(python=python_ref(data["python"]))
        except Invalid as e:
            r.problem(f"{key}.python", str(e))
            return Handler(python="workqd.handlers:sleep_dots")
    argv = data["command"]
    if (not isinstance(argv, list) or not argv
            or not all(isinstance(a, str) and a and "\0" not in a for a in argv)):
        r.problem(f"{key}.command", f"must be a non-empty list of strings (argv) without NUL "
                  f"bytes, got {_show(argv)}")
        return Handler(command=("/bin/false",))
    if not argv[0].startswith("/"):
        r.problem(f"{key}.command", f"the program must be an absolute path (no shell, no PATH "
                  f"lookup), got {_show(argv[0])}")
    elif not os.access(argv[0], os.X_OK) or os.path.isdir(argv[0]):
        r.warning(f"{key}.command", f"{argv[0]} is not an executable file (here, now): "
                  f"every task will fail until it is")
    return Handler(command=tuple(argv))


# Handlers get the daemon's environment minus these (runner.handler_environment):
# systemd's notify socket, watchdog and socket-activation variables belong to the
# master, and WORKQ_PASSWORD is workq-submit's broker password.
HIDDEN_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                    "LISTEN_PID", "LISTEN_FDNAMES", "WORKQ_PASSWORD")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def _handler_settings(r: _Reader, data: dict, key: str, python: bool) -> dict:
    """environment, working_directory, python_path, virtualenv of one handler."""
    out: dict[str, Any] = {}
    if not python:
        for name in ("python_path", "virtualenv"):
            if data.get(name) is not None:
                r.problem(f"{key}.{name}", "applies to python: handlers only")
    if data.get("environment") is not None:
        out["environment"] = _environment(r, data["environment"], f"{key}.environment")
    for name in ("working_directory", "virtualenv"):
        if data.get(name) is None or (name == "virtualenv" and not python):
            continue
        try:
            out[name] = _directory(data[name])
        except Invalid as e:
            r.problem(f"{key}.{name}", str(e))
    if python and data.get("python_path") is not None:
        value = data["python_path"]
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not value:
            r.problem(f"{key}.python_path", f"must be a list of directories, got {_show(value)}")
        else:
            try:
                out["python_path"] = tuple(_directory(v) for v in value)
            except Invalid as e:
                r.problem(f"{key}.python_path", str(e))
    for name, path in [("working_directory", out.get("working_directory")),
                       *(("python_path", p) for p in out.get("python_path", ()))]:
        if path is not None and not os.path.isdir(path):
            r.warning(f"{key}.{name}", f"{path} is not a directory (here, now)")
    if out.get("virtualenv"):
        try:
            virtualenv_site_packages(out["virtualenv"])
        except Invalid as e:
            r.problem(f"{key}.virtualenv", str(e))
    return out


def _environment(r: _Reader, raw: Any, key: str) -> tuple[tuple[str, str], ...]:
    data = r.mapping(raw, key, None)
    out = []
    for name, value in data.items():
        where = f"{key}.{name}" if isinstance(name, str) else key
        if not isinstance(name, str) or not _VARIABLE.fullmatch(name):
            r.problem(where, f"variable names are letters, digits and _, got {_show(name)}")
        elif name.startswith("WORKQ_"):
            r.problem(where, "WORKQ_* variables are workqd's own")
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)) \
                or "\0" in str(value):
            r.problem(where, f"must be a string or a number (quote true/false), got {_show(value)}")
        else:
            out.append((name, str(value)))
    return tuple(out)


def _directory(value: Any) -> str:
    value = path_text(value)
    if not value.startswith("/"):
        raise Invalid(f"must be an absolute path, got {_show(value)}")
    return os.path.normpath(value)


def virtualenv_site_packages(venv: str) -> str:
    """The site-packages directory of ``venv``; Invalid unless it was built for this Python."""
    cfg = os.path.join(venv, "pyvenv.cfg")
    try:
        raw, _ = _read_regular(cfg, 64 << 10, "pyvenv.cfg")
    except Invalid as e:
        raise Invalid(f"{venv} is not a virtualenv: {e}") from None
    values = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        k, eq, v = line.partition("=")
        if eq:
            values[k.strip().lower()] = v.strip()
    version = values.get("version_info") or values.get("version") or ""
    found = tuple(version.split(".")[:2])
    here = tuple(str(n) for n in sys.version_info[:2])
    if found != here:
        shown = ".".join(found) if version else "an unknown version"
        raise Invalid(f"{venv} was built for Python {shown} (pyvenv.cfg), this is Python "
                      f"{'.'.join(here)}: rebuild it with {sys.executable} -m venv")
    site = os.path.join(venv, "lib", f"python{here[0]}.{here[1]}", "site-packages")
    if not os.path.isdir(site):
        raise Invalid(f"{venv} has no {site}")
    return site


def _backoff(value: Any) -> tuple[float, ...]:
    if _is_number(value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Invalid(f"must be a list of seconds, got {_show(value)}")
    if len(value) > MAX_ATTEMPTS:
        raise Invalid(f"must have at most {MAX_ATTEMPTS} values, got {len(value)}")
    convert = seconds(0.001, maximum=MAX_BACKOFF, allow_zero=True)
    out = []
    for j, b in enumerate(value):
        try:
            out.append(convert(b))
        except Invalid as e:
            raise Invalid(f"[{j}] {e}") from None
    # Each delay has its own queue "<name>.delay.<delay:g>s" with a TTL in whole
    # milliseconds: two delays sharing a name but not a TTL would clash on the broker.
    ttl: dict[str, int] = {}
    for b in out:
        if ttl.setdefault(f"{b:g}", int(b * 1000)) != int(b * 1000):
            raise Invalid(f"{b!r} and another value share the delay queue name "
                          f".delay.{b:g}s; round them to differ in the first 6 digits")
    return tuple(out)


def _retry(r: _Reader, raw: Any, key: str) -> Retry:
    data = r.mapping(raw, key, {"attempts", "backoff", "max_deferrals"})
    fields = r.fields(data, key, {"attempts": whole(1, MAX_ATTEMPTS),
                                  "max_deferrals": whole(0, MAX_DEFERRALS)})
    raw_backoff = data.get("backoff")
    if isinstance(raw_backoff, dict):
        fields.update(_exponential(r, raw_backoff, f"{key}.backoff",
                                   fields.get("attempts", Retry.attempts)))
    else:
        fields.update(r.fields(data, key, {"backoff": _backoff}))
    retry = Retry(**fields)
    if len(retry.delays()) > MAX_DELAY_QUEUES:
        r.problem(f"{key}.backoff", f"needs {len(retry.delays())} delay queues, at most "
                  f"{MAX_DELAY_QUEUES} are allowed: fewer attempts, a lower max or no jitter")
    return retry


def _exponential(r: _Reader, raw: dict, key: str, attempts: int) -> dict:
    """``backoff: {initial, max, jitter}``: initial, then doubling up to max, each minus a
    random part of up to ``jitter`` of it."""
    data = r.mapping(raw, key, {"initial", "max", "jitter"})
    if "initial" not in data:
        r.problem(f"{key}.initial", "is required in the {initial, max, jitter} form")
        return {}
    got = r.fields(data, key, {"initial": seconds(0.001, maximum=MAX_BACKOFF),
                               "max": seconds(0.001, maximum=MAX_BACKOFF),
                               "jitter": fraction})
    if "initial" not in got or ("max" in data and "max" not in got) \
            or ("jitter" in data and "jitter" not in got):
        return {}   # already reported
    initial = got["initial"]
    most = got.get("max", MAX_BACKOFF)
    if most < initial:
        r.problem(f"{key}.max", f"must be at least initial ({_number(initial)}), "
                  f"got {_number(most)}")
        return {}
    steps, delay = [], initial
    for _ in range(max(1, attempts - 1)):
        steps.append(min(delay, most))
        delay *= 2
    return {"backoff": tuple(steps), "jitter": got.get("jitter", DEFAULT_JITTER)}


def fraction(value: Any) -> float:
    if not _is_number(value) or not 0 <= value <= 1 or not math.isfinite(value):
        raise Invalid(f"must be a number from 0 to 1, got {_show(value)}")
    return float(value)


_QUEUE_FIELDS: dict[str, Callable] = {
    "type": choice("quorum", "classic"),
    "workers": lambda value: _workers(value),
    "prefetch": whole(0, U16),
    "timeout": seconds(0.1),
    "timeout_grace": seconds(0, maximum=3600.0),
    "max_redeliveries": whole(1, MAX_REDELIVERIES),
    "max_tasks_per_worker": whole(0, MAX_TASKS_PER_WORKER),
    "max_memory_per_worker": sizes(0, MAX_MEMORY),
    "max_body": sizes(1, MAX_BODY),
    "import_timeout": seconds(1, maximum=86400.0),
    "allow_reply_queues": lambda value: _flag(value),
}
_QUEUE_KEYS = {"name", "handler", "retry", *_QUEUE_FIELDS, "declare", "declare_side_queues",
               "arguments", "bindings"}


def _queue(r: _Reader, raw: Any, i: int) -> Queue | None:
    key = f"queues[{i}]"
    if not isinstance(raw, dict):
        r.problem(key, f"must be a mapping with at least name and handler, got {_show(raw)}")
        return None
    data = r.mapping(raw, key, _QUEUE_KEYS)
    name = f"invalid-{i}"
    try:
        name = queue_name(data.get("name"))
    except Invalid as e:
        r.problem(f"{key}.name", "is required" if data.get("name") is None else str(e))
    handler = _handler(r, data.get("handler"), f"{key}.handler")
    kwargs = r.fields(data, key, _QUEUE_FIELDS)
    kwargs.update(_autoscale_fields(kwargs))
    kwargs.update(_ownership(r, data, key, kwargs.get("type", "quorum")))
    return Queue(name=name, handler=handler, retry=_retry(r, data.get("retry"), f"{key}.retry"),
                 **kwargs)


def _workers(value: Any) -> int | Autoscale:
    """A fixed pool size, or ``{min, max[, idle_after]}`` for an autoscaled pool."""
    if not isinstance(value, dict):
        return whole(1, MAX_TOTAL_WORKERS)(value)
    unknown = sorted(map(_show, set(value) - {"min", "max", "idle_after"}))
    if unknown:
        raise Invalid(f"unknown key(s) {', '.join(unknown)} (min, max, idle_after)")
    if "min" not in value or "max" not in value:
        raise Invalid("an autoscaled pool needs both min and max")
    converters = {"min": whole(1, MAX_TOTAL_WORKERS), "max": whole(1, MAX_TOTAL_WORKERS),
                  "idle_after": seconds(1, 86400)}
    got = {}
    for name, convert in converters.items():
        if value.get(name) is not None:
            try:
                got[name] = convert(value[name])
            except Invalid as e:
                raise Invalid(f"{name} {e}") from None
    lo, hi = got["min"], got["max"]
    idle = got.get("idle_after", Autoscale.idle_after)
    if lo > hi:
        raise Invalid(f"min {lo} is above max {hi}")
    return Autoscale(lo, hi, idle)


def _autoscale_fields(kwargs: dict) -> dict:
    """An Autoscale read from ``workers`` becomes Queue.autoscale, its min Queue.workers."""
    a = kwargs.get("workers")
    return {"workers": a.min, "autoscale": a} if isinstance(a, Autoscale) else {}


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {_show(value)}")
    return value


# Queue arguments workqd sets itself (broker.queue_arguments): a second source for them
# would make the dead-lettering, retries and poison limit silently different.
OWNED_ARGUMENTS = ("x-queue-type", "x-dead-letter-exchange", "x-dead-letter-routing-key",
                   "x-dead-letter-strategy", "x-delivery-limit", "x-message-ttl")
_WHOLE_ARGUMENTS = {"x-max-length": whole(0), "x-max-length-bytes": whole(0),
                    "x-max-priority": whole(1, 255), "x-expires": whole(1),
                    "x-single-active-consumer": _flag}


def _ownership(r: _Reader, data: dict, key: str, qtype: str) -> dict:
    """declare, declare_side_queues, arguments and bindings: queues owned by others."""
    out = r.fields(data, key, {"declare": _flag, "declare_side_queues": _flag})
    raw = data.get("arguments")
    if raw is not None:
        args = []
        for name, value in r.mapping(raw, f"{key}.arguments", None).items():
            where = f"{key}.arguments.{name}"
            if not isinstance(name, str) or not name.startswith("x-"):
                r.problem(f"{key}.arguments", f"queue arguments are named x-..., got {_show(name)}")
            elif name in OWNED_ARGUMENTS or (name == "x-overflow" and qtype == "quorum"):
                r.problem(where, "is set by workqd itself (type, retry, max_redeliveries); "
                          "leave it out")
            elif name == "x-max-priority" and qtype == "quorum":
                r.problem(where, "applies to classic queues only (type: classic)")
            elif name in _WHOLE_ARGUMENTS:
                try:
                    args.append((name, _WHOLE_ARGUMENTS[name](value)))
                except Invalid as e:
                    r.problem(where, str(e))
            elif isinstance(value, bool) or isinstance(value, (str, int)):
                args.append((name, value))
            else:
                r.problem(where, f"must be a string, a whole number or true/false, got "
                          f"{_show(value)}")
        out["arguments"] = tuple(args)
        if args and out.get("declare") is False:
            r.problem(f"{key}.arguments", "has no effect with declare: false (a passive check "
                      "takes the queue as it is)")
    raw = data.get("bindings")
    if raw is not None:
        if not isinstance(raw, list):
            r.problem(f"{key}.bindings", f"must be a list of {{exchange, routing_key}}, got "
                      f"{_show(raw)}")
            raw = []
        bindings = []
        for j, b in enumerate(raw):
            where = f"{key}.bindings[{j}]"
            b = r.mapping(b, where, {"exchange", "routing_key"})
            exchange = b.get("exchange")
            if exchange is None:
                r.problem(f"{where}.exchange", "is required")
                continue
            if (not isinstance(exchange, str) or not exchange.isprintable()
                    or len(exchange.encode("utf-8")) > MAX_NAME_BYTES):
                r.problem(f"{where}.exchange", f"must be an exchange name of at most "
                          f"{MAX_NAME_BYTES} bytes without control characters, got "
                          f"{_show(exchange)}")
                continue
            if exchange in ("", "amq.default"):
                r.problem(f"{where}.exchange", "the default exchange routes by queue name "
                          "already and cannot be bound")
                continue
            rk = b.get("routing_key", "")
            if not isinstance(rk, str) or len(rk.encode("utf-8")) > MAX_NAME_BYTES:
                r.problem(f"{where}.routing_key", f"must be a string of at most "
                          f"{MAX_NAME_BYTES} bytes, got {_show(rk)}")
                continue
            bindings.append(Binding(exchange, rk))
        out["bindings"] = tuple(bindings)
    if out.get("declare_side_queues") is False and out.get("declare", True) and qtype == "quorum":
        r.problem(f"{key}.declare_side_queues", "false needs declare: false or type: classic: "
                  "a quorum queue workqd declares dead-letters into its .dead queue")
    return out


def _side_queues(q: Queue) -> list[str]:
    return [q.dead_letter_queue] + [vocab.delay_queue(q.name, d) for d in q.retry.delays()]


def _check_queue_names(r: _Reader, queues: list[tuple[int, Queue]]) -> None:
    """Unique names, side queues within 255 bytes and not colliding with another queue."""
    owner: dict[str, int] = {}
    for i, q in queues:
        if q.name in owner:
            r.problem(f"queues[{i}].name", f'"{q.name}" is already used by queues[{owner[q.name]}]')
        else:
            owner[q.name] = i
    for i, q in queues:
        for side in _side_queues(q):
            if len(side.encode("utf-8")) > MAX_NAME_BYTES:
                r.problem(f"queues[{i}].name", f'its side queue "{side}" would be longer than '
                          f"{MAX_NAME_BYTES} bytes; shorten the name")
            elif side in owner:
                r.problem(f"queues[{owner[side]}].name", f'"{side}" is a side queue of '
                          f"queues[{i}] ({q.name})")


def parse(data: Any, path: str, file_mode: int | None = None) -> Config:
    """Build a Config from already-parsed YAML; raises ConfigError listing every problem.

    ``file_mode`` (the config file's st_mode) enables the warnings about secrets
    readable by others."""
    r = _Reader(path)
    top = r.mapping(data, "", {"broker", "metrics", "shutdown_timeout", "log", "queues",
                               "control"})
    if data is not None and not isinstance(data, dict):
        raise ConfigError(r.problems)
    if file_mode is not None and file_mode & stat.S_IWOTH:
        r.warning("", f"is writable by every local user (mode {stat.S_IMODE(file_mode):04o}), "
                  f"who could make workqd run any command: {_PERMISSIONS.format(f=path)}")
    broker = _broker(r, top.get("broker"), file_mode)
    kwargs = _metrics(r, top.get("metrics"))
    kwargs.update(_control(r, top.get("control")))
    log = r.mapping(top.get("log"), "log", {"level", "format"})
    kwargs.update({f"log_{k}": v for k, v in r.fields(
        log, "log", {"level": choice("debug", "info", "warning", "error"),
                     "format": choice("text", "json")}).items()})
    kwargs.update(r.fields(top, "", {"shutdown_timeout": seconds(0)}))
    queues: list[tuple[int, Queue]] = []
    raw_queues = top.get("queues")
    if not isinstance(raw_queues, list) or not raw_queues:
        r.problem("queues", f"must be a non-empty list of queues, got {_show(raw_queues)}")
    else:
        for i, raw in enumerate(raw_queues):
            q = _queue(r, raw, i)
            if q is not None:
                queues.append((i, q))
    _check_queue_names(r, queues)
    if sum(q.most_workers for _, q in queues) > MAX_TOTAL_WORKERS:
        r.problem("queues", f"at most {MAX_TOTAL_WORKERS} workers in all")
    if kwargs.get("metrics_basic_auth") and "metrics_tls" not in kwargs:
        r.warning("metrics.basic_auth", "without metrics.tls, passwords cross the network in "
                  "clear text")
    if r.problems:
        raise ConfigError(r.problems)
    for i, q in queues:
        if not q.declare_side_queues:
            r.warning(f"queues[{i}].declare_side_queues", f"false: {q.name}.dead and the delay "
                      f"queues are not declared, so retries are off (retry.attempts is not "
                      f"used) and a task that fails, times out or is rejected is rejected to "
                      f"the broker: the queue's own x-dead-letter-exchange takes it, or it is "
                      f"dropped")
        if q.timeout >= BROKER_CONSUMER_TIMEOUT:
            r.warning(f"queues[{i}].timeout", f"{q.timeout:g}s is not below the broker's "
                      f"consumer_timeout ({BROKER_CONSUMER_TIMEOUT}s by default): the broker "
                      f"will close the channel of a task that runs that long")
    return Config(path=path, broker=broker, queues=tuple(q for _, q in queues),
                  warnings=tuple(r.warnings), **kwargs)


def load(path: str) -> Config:
    """Read and validate the file at ``path``; raises ConfigError and nothing else."""
    try:
        raw, st = _read_regular(path, MAX_CONFIG_BYTES, "")
    except Invalid as e:
        raise ConfigError([f"{path}: {e}"]) from None
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text (byte {e.start})"]) from None
    return parse(_parse_yaml(source, path), path, st.st_mode)


def check_listen(cfg: Config) -> tuple[list[str], list[str]]:
    """(problems, warnings) about metrics.listen that need the resolver: for start and --check."""
    host, port = cfg.metrics_listen
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, OSError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        return [escape(f"{cfg.path}: metrics.listen: cannot resolve {host}: {reason}")], []
    addresses = {info[4][0] for info in infos}
    try:
        local = all(ipaddress.ip_address(a.partition("%")[0]).is_loopback for a in addresses)
    except ValueError:
        local = False
    if local:
        return [], []
    if cfg.metrics_tls and cfg.metrics_basic_auth:
        return [], []
    return [], [escape(f"{cfg.path}: metrics.listen: {host} is not a loopback address "
                       f"({', '.join(sorted(addresses))}): anyone who can reach it can read "
                       f"the metrics; set metrics.tls and metrics.basic_auth, or firewall it")]
