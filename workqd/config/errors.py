"""How problems are told: the two exceptions, and values shown escaped, shortened,
with passwords hidden."""

from __future__ import annotations

import re
import reprlib
import urllib.parse
from typing import Any


class Invalid(ValueError):
    """A value that a converter refused; the message says what was expected."""


class ConfigError(Exception):
    """The file cannot be used; ``problems`` holds one line each, control characters escaped."""

    def __init__(self, problems: list[str]):
        self.problems = [escape(line) for line in problems]
        super().__init__("\n".join(self.problems))


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
SECRET = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):\S*@")


class _Repr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<a {x.bit_length()}-bit number>"
        return repr(x)


_REPR = _Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def show(value: Any) -> str:
    """A value from the file as a message quotes it: short, and never huge."""
    if isinstance(value, str):
        return f'"{value if len(value) <= 80 else value[:77] + "..."}"'
    if value is None:
        return "null"
    return _REPR.repr(value)


def show_url(value: Any) -> str:
    if isinstance(value, str):
        return show(redact(value))
    if isinstance(value, list):
        return show([redact(v) if isinstance(v, str) else v for v in value])
    return show(value)


def number(x: float) -> str:
    """4294967.295 and 31536000, not 4.29497e+06 and 3.1536e+07."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))
