"""From a file to a Config: ``load`` reads it, ``parse`` checks every section and
the rules across them, ``check_listen`` asks the resolver about metrics.listen."""

from __future__ import annotations

import ipaddress
import socket
import stat
from typing import Any

from . import sections
from .errors import ConfigError, Invalid, escape, show
from .files import read_regular
from .limits import BROKER_CONSUMER_TIMEOUT, MAX_CONFIG_BYTES, MAX_TOTAL_WORKERS
from .model import Config, Queue
from .queues import check_names, queue
from .reader import Reader
from .schedules import schedules


def parse(data: Any, path: str, file_mode: int | None = None) -> Config:
    """Build a Config from already-parsed YAML; raises ConfigError listing every problem.

    ``file_mode`` (the config file's st_mode) enables the warnings about secrets
    readable by others."""
    r = Reader(path)
    top = r.section(data, "", "")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(r.problems)
    if file_mode is not None and file_mode & stat.S_IWOTH:
        r.warning("", f"is writable by every local user (mode {stat.S_IMODE(file_mode):04o}), "
                  f"who could make workqd run any command: {sections.PERMISSIONS.format(f=path)}")
    broker = sections.broker(r, top.get("broker"), file_mode)
    kwargs = sections.metrics(r, top.get("metrics"))
    kwargs.update(sections.control(r, top.get("control")))
    kwargs.update(sections.log(r, top.get("log")))
    kwargs.update(r.settings(top, "", ""))
    queues = _queues(r, top.get("queues"))
    kwargs["schedules"] = schedules(r, top.get("schedules"))
    if kwargs.get("metrics_basic_auth") and "metrics_tls" not in kwargs:
        r.warning("metrics.basic_auth", "without metrics.tls, passwords cross the network in "
                  "clear text")
    if r.problems:
        raise ConfigError(r.problems)
    _warn_queues(r, queues)
    return Config(path=path, broker=broker, queues=tuple(q for _, q in queues),
                  warnings=tuple(r.warnings), **kwargs)


def _queues(r: Reader, raw_queues: Any) -> list[tuple[int, Queue]]:
    """(index, Queue) of each entry that could be read, checked across queues."""
    queues: list[tuple[int, Queue]] = []
    if not isinstance(raw_queues, list) or not raw_queues:
        r.problem("queues", f"must be a non-empty list of queues, got {show(raw_queues)}")
    else:
        for i, raw in enumerate(raw_queues):
            q = queue(r, raw, i)
            if q is not None:
                queues.append((i, q))
    check_names(r, queues)
    if sum(q.most_workers for _, q in queues) > MAX_TOTAL_WORKERS:
        r.problem("queues", f"at most {MAX_TOTAL_WORKERS} workers in all")
    return queues


def _warn_queues(r: Reader, queues: list[tuple[int, Queue]]) -> None:
    """Valid settings that still deserve a line at start."""
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


def load(path: str) -> Config:
    """Read and validate the file at ``path``; raises ConfigError and nothing else."""
    try:
        raw, st = read_regular(path, MAX_CONFIG_BYTES, "")
    except Invalid as e:
        raise ConfigError([f"{path}: {e}"]) from None
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text (byte {e.start})"]) from None
    # PyYAML is imported by the first file read, not by every importer of the config
    # package: workq-submit without -c and the client never read one.
    from .yamlsafe import parse_yaml
    return parse(parse_yaml(source, path), path, st.st_mode)


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
