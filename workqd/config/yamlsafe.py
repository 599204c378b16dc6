"""YAML with limits: PyYAML's safe loader, composing under a node count and a
depth limit, then checked for alias expansion, cycles, long numbers and keys
written twice. Whatever the text holds, ``parse_yaml`` raises only ConfigError."""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from .errors import ConfigError
from .limits import MAX_DEPTH, MAX_NODES, MAX_NUMBER_CHARS, MAX_VALUES


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


def parse_yaml(source: str, path: str) -> Any:
    """The document in ``source`` as Python values; ConfigError for anything else."""
    loader = None
    try:
        loader = _Loader(source)
        root = loader.get_single_node()
        duplicates = _inspect(root)
        if duplicates:
            raise ConfigError([f"{path}: {_key_path(where)}: {message}" for where, message in duplicates])
        return None if root is None else loader.construct_document(root)
    except _Refused as e:
        raise ConfigError([f"{path}: {_refused(e)}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: YAML syntax error: {_syntax(e)}"]) from None
    except ConfigError:
        raise
    except Exception as e:
        # PyYAML's constructors raise ValueError, IndexError, AttributeError... for
        # values such as 2024-02-30, !!timestamp x or !!int "": all mean a bad value.
        raise ConfigError([f"{path}: YAML value error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _refused(e: _Refused) -> str:
    where = _key_path(e.where)
    line = f" (line {e.line})" if e.line else ""
    return f"{where + ': ' if where else ''}{e.message}{line}"


def _syntax(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + (getattr(e, "problem", None) or (str(e).splitlines() or ["?"])[0])
