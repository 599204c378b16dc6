"""Files the configuration names: only regular ones, only so many bytes, never
blocking; the broker password, TLS certificates and keys, a handler's virtualenv."""

from __future__ import annotations

import os
import ssl
import stat
import sys
from typing import Any, Callable

from .convert import path_text, size_text
from .errors import Invalid
from .limits import MAX_SECRET_BYTES


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


def read_regular(path: str, limit: int, name: str) -> tuple[bytes, os.stat_result]:
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
        raise Invalid(f"{name + ' ' if name else ''}is larger than {size_text(limit)}, "
                      f"the limit for this file")
    return b"".join(chunks), st


def check_readable(path: str) -> os.stat_result:
    fd, st = _open_regular(path, path)
    os.close(fd)
    return st


def _no_passphrase() -> bytes:
    raise Invalid("the key is encrypted; workqd needs a key without a passphrase")


def load_tls(make: Callable[[], ssl.SSLContext], cert: str | None, key: str | None,
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


def read_password(pw_file: str) -> str:
    """The secret in ``pw_file`` now; raises Invalid (with the reason) when it cannot be used.

    The one password-file reader: broker.password_file at every connect, and
    workq-submit's --password-file, so both refuse the same files in the same words."""
    return read_password_stat(pw_file)[0]


def read_password_stat(pw_file: str) -> tuple[str, os.stat_result]:
    """``read_password`` and the file's stat, for the check of who may read it."""
    raw, st = read_regular(pw_file, MAX_SECRET_BYTES, pw_file)
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


def virtualenv_site_packages(venv: str) -> str:
    """The site-packages directory of ``venv``; Invalid unless it was built for this Python."""
    cfg = os.path.join(venv, "pyvenv.cfg")
    try:
        raw, _ = read_regular(cfg, 64 << 10, "pyvenv.cfg")
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


def readable_file(value: Any) -> str:
    """A file name that names a regular file this process can open now."""
    value = path_text(value)
    check_readable(value)
    return value
