"""Writes the key reference from the schema: a section of workqd.yaml(5) and a
commented block of the shipped etc/workqd/workqd.yaml, each between marker lines.

``python -m workqd.config.docgen`` (``make config-docs``) rewrites both files;
with ``--check`` it only says whether they match the schema (exit status 1 if
not), as tests/test_config_schema.py does.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from .convert import size_text
from .errors import number
from .schema import KEYS, RESTART, Key

MAN_PAGE = "packaging/man/workqd.yaml.5"
DEFAULT_CONFIG = "etc/workqd/workqd.yaml"
MAN_BEGIN = '.\\" BEGIN KEY REFERENCE (generated from workqd/config/schema.py: make config-docs)'
MAN_END = '.\\" END KEY REFERENCE'
YAML_BEGIN = "# --- BEGIN KEY REFERENCE (generated from workqd/config/schema.py: make config-docs)"
YAML_END = "# --- END KEY REFERENCE"


def default_text(key: Key) -> str:
    """The default as the file would write it."""
    if key.required:
        return "required"
    value = key.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return number(value)
    if isinstance(value, list):
        return "[" + ", ".join(number(v) for v in value) + "]"
    return value if value else '""'


def limits_text(key: Key) -> str:
    """Type and range: "seconds, 0.1 to 31536000"."""
    if key.choices:
        return "one of " + ", ".join(key.choices)
    if key.low is None:
        return key.type
    if key.type == "size":
        return f"{key.type}, {size_text(key.low)} to {size_text(key.high)}"
    return f"{key.type}, {number(key.low)} to {number(key.high)}"


def reload_text(key: Key) -> str:
    return "needs a restart" if key.reload == RESTART else "applies on reload"


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def man_reference() -> list[str]:
    lines = [".SH KEY REFERENCE",
             "Every key, its type and range, its default, and whether a reload",
             ".RB ( SIGHUP )",
             "applies it; the sections above say more.",
             "A path names list entries with",
             ".BR [] ."]
    for key in KEYS:
        lines += [".TP", f".B {_roff(key.path)}", _roff(key.doc), ".br",
                  _roff(f"{_upper_first(limits_text(key))}; default {default_text(key)}; "
                        f"{reload_text(key)}.")]
    return lines


def yaml_reference() -> list[str]:
    lines = ["# Every key: its default, type and range, whether a reload (SIGHUP) applies it.",
             "# A path names list entries with []. See workqd.yaml(5)."]
    for key in KEYS:
        lines.append(f"# {key.path}: {default_text(key)}")
        lines.append(f"#     {limits_text(key)}; {reload_text(key)}")
        lines += textwrap.wrap(key.doc, 96, initial_indent="#     ", subsequent_indent="#     ")
    return lines


def replace_between(text: str, begin: str, end: str, body: list[str], name: str) -> str:
    """``text`` with the lines between the marker lines ``begin`` and ``end`` replaced."""
    lines = text.splitlines()
    try:
        start, stop = lines.index(begin), lines.index(end)
    except ValueError:
        raise SystemExit(f"{name}: the marker lines {begin!r} and {end!r} are missing") from None
    if stop < start:
        raise SystemExit(f"{name}: {end!r} comes before {begin!r}")
    return "\n".join(lines[:start + 1] + body + lines[stop:]) + "\n"


def rendered(root: Path) -> dict[Path, str]:
    """Each generated file's path and the text it should have."""
    man, default = root / MAN_PAGE, root / DEFAULT_CONFIG
    return {
        man: replace_between(man.read_text(), MAN_BEGIN, MAN_END, man_reference(), MAN_PAGE),
        default: replace_between(default.read_text(), YAML_BEGIN, YAML_END, yaml_reference(),
                                 DEFAULT_CONFIG),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workqd.config.docgen", description=__doc__)
    p.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    p.add_argument("root", nargs="?", default=".", help="the source tree (default: .)")
    args = p.parse_args(argv)
    stale = []
    for path, text in rendered(Path(args.root)).items():
        if path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print("out of date with workqd/config/schema.py (run make config-docs): "
              + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
