"""Checks of command-line arguments shared by workq-submit and workqctl's AMQP commands:
each refusal is one line (UsageError, exit 2) before any connection is opened."""

from __future__ import annotations

import os
import re
import ssl
import stat
import urllib.parse

from . import config as config_mod
from .broker import redact
from .client import Node, describe, node_for

CONFIG_MAX = 16 * 1024 * 1024  # a -c file (only to refuse /dev/zero before reading it)
SHORTSTR = 255                 # AMQP limit for queue names, header keys, message ids (bytes)
PASSWORD_ENV = "WORKQ_PASSWORD"


class UsageError(Exception):
    pass


def utf8(option: str, value: str, max_bytes: int | None = SHORTSTR) -> str:
    """``value`` if the broker can take it as an AMQP string; ``max_bytes`` for a shortstr."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise UsageError(f"{option}: not valid UTF-8") from None
    if max_bytes is not None and size > max_bytes:
        raise UsageError(f"{option}: longer than {max_bytes} bytes")
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise UsageError(f"{option} {value!r}: contains a control character")
    return value


def queue_name(option: str, value: str) -> str:
    if not value:
        raise UsageError(f"{option}: empty queue name")
    return utf8(f"{option} {value}", value)


def read_regular(path: str, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; FIFOs, devices and
    directories are refused before a read could block or never end."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {path}: not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > limit:
            raise UsageError(f"{what} {path}: larger than {_size(limit)}")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while we read it
        raise UsageError(f"{what} {path}: larger than {_size(limit)}")
    return data


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a file"


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n >= 1024 * 1024 else f"{n // 1024} KiB"


def safe_redact(url: str) -> str:
    """``redact`` for any string, also one that urlsplit cannot parse."""
    try:
        return redact(url)
    except ValueError:
        return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def check_url(url: str) -> str:
    """``url`` if it names an amqp(s) broker with a host and a usable port."""
    if not url:
        raise UsageError("--url '': empty URL")
    shown = safe_redact(url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UsageError(f"broker URL {shown}: {e}") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise UsageError(f"broker URL {shown}: must start with amqp:// or amqps://")
    if not parts.hostname:
        raise UsageError(f"broker URL {shown}: no host")
    if port == 0:
        raise UsageError(f"broker URL {shown}: port 0")
    return url


def load_config(path: str) -> config_mod.Config:
    read_regular(path, CONFIG_MAX, "-c")  # refuses FIFOs and devices before load() reads
    try:
        return config_mod.load(path)
    except config_mod.ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any file must end in one line, not a traceback
        raise UsageError(f"{path}: cannot be used: {type(e).__name__}: {e}") from None


def check_tls_files(broker: config_mod.Broker, source: str) -> None:
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(broker.tls, key)
        if path:
            read_regular(path, CONFIG_MAX, f"{source}: broker.tls.{key}")


def nodes_for(urls: list[str], broker: config_mod.Broker, source: str,
              confirm_timeout: float) -> list[Node]:
    """Connection parameters for every URL, built now so that a bad URL or TLS file is
    a usage error (exit 2) before anything is published."""
    if any(urllib.parse.urlsplit(u).scheme == "amqps" for u in urls):
        check_tls_files(broker, source)
    nodes = []
    for url in urls:
        shown = safe_redact(url)
        parts = urllib.parse.urlsplit(url)
        if parts.username and parts.password is None and broker.password is None:
            raise UsageError(f"broker URL {shown} names user {parts.username!r} but no password: "
                             f"use --password-file or ${PASSWORD_ENV}")
        try:
            node = node_for(broker, url, "workq-submit", confirm_timeout)
        except ssl.SSLError as e:  # a CA, certificate or key file that is not PEM
            raise UsageError(f"{source}: broker.tls: cannot load the TLS files: "
                             f"{e.reason or e}") from None
        except Exception as e:  # noqa: BLE001 - pika's URL and ssl errors have no common base
            raise UsageError(f"cannot use broker URL {shown}: {describe(e)}") from None
        nodes.append(Node(shown, node.params))
    return nodes
