"""Broker URLs: the amqp:// and amqps:// URLs pika will accept, checked here so
that a bad one is one line at --check rather than a failure at connect."""

from __future__ import annotations

import ast
import math
import re
import urllib.parse
from typing import Any

from .convert import host_name, port_number, split_host_port, text
from .errors import Invalid, show, show_url
from .limits import MAX_NAME_BYTES, U16

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
    shown = show_url(url)
    userinfo, netloc, path, query = _split_url(url, shown)
    try:
        if userinfo is not None:
            _check_userinfo(userinfo)
        _check_host(netloc)
        _check_vhost(path)
        if query:
            _check_query(url, query)
    except Invalid as e:
        raise Invalid(f"{e}, in {shown}") from None
    return url


def _split_url(url: str, shown: str) -> tuple[str | None, str, str, str]:
    """(userinfo or None, host[:port], vhost, query); refuses what no part could fix."""
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
        return (userinfo if at else None), netloc, "", query
    path, _, query = path_query.partition("?")
    return (userinfo if at else None), netloc, path, query


def _check_userinfo(userinfo: str) -> None:
    user, _, password = userinfo.partition(":")
    if not _unquote(user, "user name"):
        raise Invalid("the user name is empty")
    _unquote(password, "password")


def _check_host(netloc: str) -> None:
    host, port = split_host_port(netloc)
    if not host:
        raise Invalid("there is no host")
    host_name(host)
    if port is not None:
        port_number(port)


def _check_vhost(path: str) -> None:
    if "/" in path:
        raise Invalid("the vhost must be one path segment (write / as %2F)")
    if len(_unquote(path, "vhost").encode("utf-8")) > MAX_NAME_BYTES:
        raise Invalid(f"the vhost is longer than {MAX_NAME_BYTES} bytes")


_WHOLE_OPTIONS = ("heartbeat", "channel_max", "frame_max", "connection_attempts")
_DICT_OPTIONS = ("client_properties", "tcp_options")


def _check_query(url: str, query: str) -> None:
    """Each option known to pika, given once, with a value pika takes."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True,
                                       errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise Invalid("the query string is malformed (want name=value&name=value)") from None
    names = [name for name, _ in pairs]
    for name, value in pairs:
        _check_option(name, value, names.count(name))
    _check_with_pika(url)


def _check_option(name: str, value: str, times: int) -> None:
    if name == "ssl_options":
        raise Invalid("ssl_options is not used: set broker.tls and use amqps://")
    if name not in URL_OPTIONS:
        raise Invalid(f"unknown query option {show(name)} (known: {', '.join(URL_OPTIONS)})")
    if times > 1:
        raise Invalid(f"query option {name} is given twice")
    if name in _WHOLE_OPTIONS:
        if not re.fullmatch(r"[0-9]{1,9}", value, re.ASCII):
            raise Invalid(f"query option {name} must be a whole number, got {show(value)}")
        if name == "heartbeat" and int(value) > U16:
            raise Invalid(f"query option heartbeat must be at most {U16}, got {value}")
    elif name in _DICT_OPTIONS:
        if not isinstance(_literal(value), dict):
            raise Invalid(f"query option {name} must be a Python dict literal, got {show(value)}")
    elif name != "locale" and not _finite(value):
        raise Invalid(f"query option {name} must be a finite number, got {show(value)}")


def _finite(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except Exception:  # SyntaxError, ValueError, MemoryError, RecursionError: all "no"
        return None


def _check_with_pika(url: str) -> None:
    """pika's own checks (frame_max and channel_max ranges, positive timeouts, ...),
    on the URL without its user and password, as broker.connection_parameters does."""
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
