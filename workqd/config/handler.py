"""The reader of a queue's handler: python or command, and the settings they take."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from .convert import directory, python_ref
from .errors import Invalid, show
from .files import virtualenv_site_packages
from .model import Handler
from .reader import Reader

SECTION = "queues[].handler"
PYTHON_ONLY = ("python_path", "virtualenv")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# What a handler that could not be read stands for, so that reading goes on and
# every other problem of the file is reported too.
_PLACEHOLDER = Handler(python="workqd.handlers:sleep_dots")


def handler(r: Reader, raw: Any, key: str) -> Handler:
    program = _program(r, raw, key)
    data = raw if isinstance(raw, dict) else {}
    settings = _settings(r, data, key, python=program.python is not None)
    return dataclasses.replace(program, **settings) if settings else program


def _program(r: Reader, raw: Any, key: str) -> Handler:
    data = r.section(raw, key, SECTION)
    if not isinstance(raw, dict):
        if raw is None:
            r.problem(key, "is required")
        return _PLACEHOLDER
    if ("python" in data) == ("command" in data):
        r.problem(key, "give exactly one of python: \"module:function\" or command: [argv...]")
        return _PLACEHOLDER
    if "command" in data:
        return _command(r, data["command"], f"{key}.command")
    try:
        return Handler(python=python_ref(data["python"]))
    except Invalid as e:
        r.problem(f"{key}.python", str(e))
        return _PLACEHOLDER


def _command(r: Reader, argv: Any, key: str) -> Handler:
    if (not isinstance(argv, list) or not argv
            or not all(isinstance(a, str) and a and "\0" not in a for a in argv)):
        r.problem(key, f"must be a non-empty list of strings (argv) without NUL "
                  f"bytes, got {show(argv)}")
        return Handler(command=("/bin/false",))
    if not argv[0].startswith("/"):
        r.problem(key, f"the program must be an absolute path (no shell, no PATH "
                  f"lookup), got {show(argv[0])}")
    elif not os.access(argv[0], os.X_OK) or os.path.isdir(argv[0]):
        r.warning(key, f"{argv[0]} is not an executable file (here, now): "
                  f"every task will fail until it is")
    return Handler(command=tuple(argv))


def _settings(r: Reader, data: dict, key: str, python: bool) -> dict:
    """environment, working_directory, python_path, virtualenv of one handler."""
    if not python:
        for name in PYTHON_ONLY:
            if data.get(name) is not None:
                r.problem(f"{key}.{name}", "applies to python: handlers only")
    out: dict[str, Any] = {}
    if data.get("environment") is not None:
        out["environment"] = _environment(r, data["environment"], f"{key}.environment")
    out.update(r.settings(data, key, SECTION, skip=() if python else PYTHON_ONLY))
    if python and data.get("python_path") is not None:
        out.update(_python_path(r, data["python_path"], f"{key}.python_path"))
    _warn_missing_directories(r, key, out)
    if out.get("virtualenv"):
        try:
            virtualenv_site_packages(out["virtualenv"])
        except Invalid as e:
            r.problem(f"{key}.virtualenv", str(e))
    return out


def _python_path(r: Reader, value: Any, key: str) -> dict:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value:
        r.problem(key, f"must be a list of directories, got {show(value)}")
        return {}
    try:
        return {"python_path": tuple(directory(v) for v in value)}
    except Invalid as e:
        r.problem(key, str(e))
        return {}


def _warn_missing_directories(r: Reader, key: str, out: dict) -> None:
    for name, path in [("working_directory", out.get("working_directory")),
                       *(("python_path", p) for p in out.get("python_path", ()))]:
        if path is not None and not os.path.isdir(path):
            r.warning(f"{key}.{name}", f"{path} is not a directory (here, now)")


def _environment(r: Reader, raw: Any, key: str) -> tuple[tuple[str, str], ...]:
    data = r.mapping(raw, key, None)
    out = []
    for name, value in data.items():
        where = f"{key}.{name}" if isinstance(name, str) else key
        if not isinstance(name, str) or not _VARIABLE.fullmatch(name):
            r.problem(where, f"variable names are letters, digits and _, got {show(name)}")
        elif name.startswith("WORKQ_"):
            r.problem(where, "WORKQ_* variables are workqd's own")
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)) \
                or "\0" in str(value):
            r.problem(where, f"must be a string or a number (quote true/false), got {show(value)}")
        else:
            out.append((name, str(value)))
    return tuple(out)
