"""Readers of the sections other than queues: broker, metrics, control, log.

Simple keys are read from the schema (``Reader.settings``); what is left here is
what needs code: url or urls, the password file, files that must load together
as TLS, basic-auth users, and the warnings that weigh one key against another.
"""

from __future__ import annotations

import os
import ssl
import stat
import urllib.parse
from typing import Any

from .. import webauth
from . import schema
from .convert import path_text
from .errors import Invalid, show, show_url
from .files import load_tls, read_password_stat
from .model import TLS, Broker, MetricsTLS
from .reader import Reader
from .urls import amqp_url, url_warnings

PERMISSIONS = "chmod 640 {f} && chown root:workqd {f}"


def broker(r: Reader, raw: Any, file_mode: int | None) -> Broker:
    data = r.section(raw, "broker", "broker")
    keyed = _urls(r, data)
    kwargs: dict[str, Any] = {"urls": tuple(u for _, u in keyed)} if keyed else {}
    kwargs.update(r.settings(data, "broker", "broker"))
    pw_file, pw_stat = None, None
    if data.get("password_file") is not None:
        pw_file, pw_stat = _password_file(r, data["password_file"], kwargs)
    for key, url in keyed:
        for warning in url_warnings(url):
            r.warning(key, warning)
        _url_password(r, key, url, data.get("password_file") is not None, pw_file, file_mode)
    if pw_stat is not None and pw_stat.st_mode & stat.S_IROTH:
        r.warning("broker.password_file", f"{pw_file} is readable by every local user (mode "
                  f"{stat.S_IMODE(pw_stat.st_mode):04o}): {PERMISSIONS.format(f=pw_file)} "
                  f"(or chmod 600 with owner workqd)")
    kwargs["tls"] = _broker_tls(r, data.get("tls"))
    if kwargs["tls"] != TLS() and not any(u.startswith("amqps://") for _, u in keyed):
        r.warning("broker.tls", "is not used: no broker URL is amqps://")
    return Broker(**kwargs)


def _urls(r: Reader, data: dict) -> list[tuple[str, str]]:
    """(key path, URL) of each valid URL given as url or urls."""
    if data.get("url") is not None and data.get("urls") is not None:
        r.problem("broker", "give either url or urls, not both")
    if data.get("urls") is not None:
        raw_urls = data["urls"]
        if not isinstance(raw_urls, list) or not raw_urls:
            r.problem("broker.urls", f"must be a non-empty list of URLs, got {show_url(raw_urls)}")
            return []
        given = [(f"broker.urls[{i}]", u) for i, u in enumerate(raw_urls)]
    elif data.get("url") is not None:
        given = [("broker.url", data["url"])]
    else:
        return []
    keyed = []
    for key, u in given:
        try:
            keyed.append((key, amqp_url(u)))
        except Invalid as e:
            r.problem(key, str(e))
    return keyed


def _password_file(r: Reader, value: Any, kwargs: dict) -> tuple[str | None, os.stat_result | None]:
    """(file name, its stat) of password_file, the password put in ``kwargs``."""
    pw_file = None
    try:
        pw_file = path_text(value)
        kwargs["password"], pw_stat = read_password_stat(pw_file)
        kwargs["password_file"] = pw_file
        return pw_file, pw_stat
    except Invalid as e:
        r.problem("broker.password_file", str(e))
        return pw_file, None


def _url_password(r: Reader, key: str, url: str, pw_given: bool, pw_file: str | None,
                  file_mode: int | None) -> None:
    """A user without a password, a password overridden, or one others can read."""
    parts = urllib.parse.urlsplit(url)
    if parts.username and parts.password is None and not pw_given:
        r.problem(key, "names a user but no password: add it, or set broker.password_file")
    elif parts.password is not None and pw_file:
        r.warning(key, "the password in the URL is not used: broker.password_file overrides it")
    elif (parts.password is not None and file_mode is not None and file_mode & stat.S_IROTH
          and (parts.username, parts.password) != ("guest", "guest")):
        r.warning(key, f"holds a password and {r.path} is readable by every local user "
                  f"(mode {stat.S_IMODE(file_mode):04o}): {PERMISSIONS.format(f=r.path)}, "
                  f"or move the password to broker.password_file")


def _tls_files(r: Reader, data: dict, section: str) -> dict[str, str]:
    """The files of ``section`` that are set: the name, or "" when it is unusable
    (a problem already)."""
    got = r.settings(data, section, section)
    return {k.name: got.get(k.name, "") for k in schema.children(section)
            if data.get(k.name) is not None}


def _broker_tls(r: Reader, raw: Any) -> TLS:
    data = r.section(raw, "broker.tls", "broker.tls")
    files = _tls_files(r, data, "broker.tls")
    if "key_file" in files and "cert_file" not in files:
        r.problem("broker.tls.key_file", "needs cert_file (the client certificate)")
    elif all(files.values()) and files:
        why = load_tls(ssl.create_default_context, files.get("cert_file"),
                       files.get("key_file"), files.get("ca_file"))
        if why:
            r.problem("broker.tls", why)
    return TLS(**{k: v for k, v in files.items() if v})


def metrics(r: Reader, raw: Any) -> dict[str, Any]:
    """Config's metrics_* fields."""
    data = r.section(raw, "metrics", "metrics")
    out = {f"metrics_{k}": v for k, v in r.settings(data, "metrics", "metrics").items()}
    tls = _metrics_tls(r, data.get("tls"))
    if tls is not None:
        out["metrics_tls"] = tls
    auth = _basic_auth(r, data.get("basic_auth"))
    if auth:
        out["metrics_basic_auth"] = auth
    return out


def _metrics_tls(r: Reader, raw: Any) -> MetricsTLS | None:
    data = r.section(raw, "metrics.tls", "metrics.tls")
    files = _tls_files(r, data, "metrics.tls")
    if files and ("cert_file" not in files or "key_file" not in files):
        r.problem("metrics.tls", "needs both cert_file and key_file")
        return None
    if not files or not all(files.values()):
        return None
    why = load_tls(lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files["cert_file"],
                   files["key_file"], files.get("client_ca_file"))
    if why:
        r.problem("metrics.tls", why)
    return MetricsTLS(**files)


def _basic_auth(r: Reader, raw: Any) -> tuple[tuple[str, str], ...]:
    users = r.mapping(raw, "metrics.basic_auth", None)
    auth = []
    for user, line in users.items():
        key = f"metrics.basic_auth.{user if isinstance(user, str) and user else show(user)}"
        if (not isinstance(user, str) or not user or ":" in user
                or any(not c.isprintable() for c in user)):
            r.problem(key, "a user name must be a non-empty string without : or control characters")
            continue
        try:
            webauth.parse_hash(line)
            auth.append((user, line))
        except ValueError as e:
            r.problem(key, str(e))
    return tuple(auth)


def control(r: Reader, raw: Any) -> dict[str, Any]:
    """Config's control_* fields: the workqctl socket's path."""
    data = r.section(raw, "control", "control")
    return {f"control_{k}": v for k, v in r.settings(data, "control", "control").items()}


def log(r: Reader, raw: Any) -> dict[str, Any]:
    """Config's log_* fields."""
    data = r.section(raw, "log", "log")
    return {f"log_{k}": v for k, v in r.settings(data, "log", "log").items()}
