"""Value converters: each takes a value from the YAML and returns it converted,
or raises ``Invalid`` saying what it expected (never naming the key: the
reader adds the key path)."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from typing import Any, Callable

from .errors import Invalid, number, show
from .limits import MAX_MEMORY, MAX_NAME_BYTES, MAX_SECONDS, MAX_SOCKET_PATH, U16


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def whole(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise Invalid(f"must be a whole number >= {minimum}, got {show(value)}")
        if maximum is not None and value > maximum:
            raise Invalid(f"must be at most {maximum}, got {show(value)}")
        return value
    return convert


def seconds(minimum: float, maximum: float = MAX_SECONDS,
            allow_zero: bool = False) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if is_number(value) and isinstance(value, float) and not math.isfinite(value):
            raise Invalid(f"must be a finite number of seconds, got {show(value)}")
        if not is_number(value) or not (value >= minimum or (allow_zero and value == 0)):
            raise Invalid(f"must be a number of seconds >= {number(minimum)}, got {show(value)}")
        if value > maximum:
            raise Invalid(f"must be at most {number(maximum)} seconds, got {show(value)}")
        return float(value)
    return convert


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"must be a non-empty string, got {show(value)}")
    return value


def path_text(value: Any) -> str:
    """A file name: a non-empty string without control characters."""
    value = text(value)
    if not value.isprintable():
        raise Invalid(f"must be a file name without control characters, got {show(value)}")
    return value


def choice(*options: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise Invalid(f"must be one of {', '.join(options)}, got {show(value)}")
        return value
    return convert


_SIZE = re.compile(r"\s*([0-9]{1,20})\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*", re.ASCII)
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
          "KB": 1000, "MB": 10**6, "GB": 10**9, "k": 1 << 10, "K": 1 << 10,
          "M": 1 << 20, "G": 1 << 30}


def size_text(n: int) -> str:
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
            raise Invalid(f"must be a size such as 512MiB or 0, got {show(value)}")
        n = int(m.group(1)) * _UNITS[m.group(2)]
    if n < minimum:
        raise Invalid(f"must be at least {size_text(minimum)}, got {show(value)}")
    if n > maximum:
        raise Invalid(f"must be at most {size_text(maximum)}, got {show(value)}")
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
                      f"got {show(value)}")
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
        raise Invalid(f"must be an IP address or a host name, got {show(host)}")
    return host


def port_number(text_: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text_, re.ASCII) or not 0 < int(text_) <= U16:
        raise Invalid(f"the port must be a number from 1 to {U16}, got {show(text_)}")
    return int(text_)


def split_host_port(hostport: str) -> tuple[str, str | None]:
    """("host", "port" or None) of ``host[:port]`` or ``[v6][:port]``."""
    if hostport.startswith("["):
        inside, bracket, after = hostport[1:].partition("]")
        if not bracket or after and not after.startswith(":"):
            raise Invalid(f"an IPv6 address must be written [ADDRESS]:PORT, got {show(hostport)}")
        if ":" not in inside:
            raise Invalid(f"brackets are for IPv6 addresses, got {show(hostport)}")
        return inside, after[1:] if after else None
    host, colon, port = hostport.rpartition(":")
    if not colon:
        return hostport, None
    if ":" in host:
        raise Invalid(f"write an IPv6 address in brackets, e.g. [::1]:9464, got {show(hostport)}")
    return host, port


def listen_address(value: Any) -> tuple[str, int]:
    s = text(value)
    try:
        host, port = split_host_port(s)
        if not host or port is None:
            raise Invalid(f"got {show(value)}")
        host_name(host)
        return host, port_number(port)
    except Invalid as e:
        raise Invalid(f"must be HOST:PORT (e.g. 127.0.0.1:9464 or [::1]:9464): {e}") from None


def python_ref(value: Any) -> str:
    """``package.module:function``, each part a Python identifier."""
    module, colon, func = value.partition(":") if isinstance(value, str) else ("", "", "")
    parts = module.split(".") + func.split(".")
    if not colon or not all(p.isidentifier() for p in parts):
        raise Invalid(f'must look like "package.module:function", got {show(value)}')
    return value


def fraction(value: Any) -> float:
    if not is_number(value) or not 0 <= value <= 1 or not math.isfinite(value):
        raise Invalid(f"must be a number from 0 to 1, got {show(value)}")
    return float(value)


def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {show(value)}")
    return value


def directory(value: Any) -> str:
    value = path_text(value)
    if not value.startswith("/"):
        raise Invalid(f"must be an absolute path, got {show(value)}")
    return os.path.normpath(value)


def socket_path(value: Any) -> str:
    """An absolute path short enough for an AF_UNIX socket address."""
    path = path_text(value)
    if not path.startswith("/"):
        raise Invalid(f"must be an absolute path, got {show(path)}")
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise Invalid(f"at most {MAX_SOCKET_PATH} bytes (a Unix socket path), "
                      f"got {len(path.encode())}")
    return path
