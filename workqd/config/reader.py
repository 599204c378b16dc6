"""Walks the YAML mappings, converting values and collecting problems by key path."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from . import schema
from .errors import SECRET, Invalid, escape, show


class Reader:
    """One pass over one file: ``problems`` refuse it, ``warnings`` are logged."""

    def __init__(self, path: str):
        self.path = path
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def _line(self, key: str, message: str) -> str:
        line = f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}"
        return SECRET.sub(r"\1:***@", line)

    def problem(self, key: str, message: str) -> None:
        self.problems.append(self._line(key, message))

    def warning(self, key: str, message: str) -> None:
        self.warnings.append(escape(self._line(key, message)))

    def mapping(self, value: Any, key: str, allowed: set[str] | None) -> dict:
        """``value`` as a dict (None: empty); keys outside ``allowed`` are problems."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(key, f"must be a mapping, got {show(value)}")
            return {}
        if allowed is not None:
            for unknown in sorted(show(k) if not isinstance(k, str) else k
                                  for k in value if k not in allowed):
                self.problem(f"{key}.{unknown}" if key else unknown,
                             f"unknown key (known: {', '.join(sorted(allowed))})")
        return value

    def section(self, value: Any, key: str, section: str) -> dict:
        """``mapping`` with the key names the schema declares for ``section``."""
        return self.mapping(value, key, schema.names(section))

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

    def settings(self, data: dict, key: str, section: str, skip: Iterable[str] = (),
                 **custom: Callable) -> dict:
        """``fields`` for the simple keys the schema declares in ``section`` (plus the
        ``custom`` converters of keys whose shape needs code), in declaration order."""
        converters = {k.name: custom.get(k.name) or schema.converter(k.path)
                      for k in schema.children(section)
                      if (k.simple or k.name in custom) and k.name not in skip}
        return self.fields(data, key, converters)
