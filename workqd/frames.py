"""Content headers from foreign producers: a value pika cannot decode becomes a marker.

pika decodes a message's properties inside its I/O loop, while it reads the
socket. A header value it cannot turn into Python (a typed timestamp past year
9999, written in milliseconds by a producer that meant seconds; a double that is
NaN; a field type it does not know; a table that ends early; tables nested so deep
that the decode overflows the stack) raises there, the exception tears the whole
connection down, the broker redelivers the message, and the next connection dies
the same way, for ever: the task behind it never runs and no worker is ever seen
busy with it. Other clients (Node.js amqplib, the Java client) write such values
without complaint, and RabbitMQ passes them through.

``install()`` wraps ``pika.spec.BasicProperties.decode`` (the one call that decodes
a content header, for consumers and basic_get alike, in pika 1.2 to 1.4): pika's
own decode runs first and, when it raises, the properties are decoded again here,
value by value, with nesting bounded by MAX_DEPTH. A value that cannot be read
becomes an ``Undecodable`` string that says what it was, so the message reaches
the worker's intake, which dead-letters it unrun as ``malformed``, and the copy
stays publishable and readable by pika. ``problems(props)`` lists what was replaced
and why, by path (``headers.x-foo.bar``).

Cost: a message pika decodes pays one extra call and, only when its properties are
large enough to nest past MAX_DEPTH, a walk of its headers.
"""

from __future__ import annotations

import datetime
import decimal
import struct

from pika import data, spec

MAX_DEPTH = 64          # tables and arrays nested in one another, the headers table included
# Each level of nesting takes at least 5 bytes (a type byte and a length), so
# properties shorter than this cannot nest past MAX_DEPTH: no walk needed.
DEEP_GATE = MAX_DEPTH * 5
ATTR = "workq_undecodable"   # set on a properties object the guard had to repair

# Bytes after the type byte, for each scalar type pika decodes.
_FIXED = {b"t": 1, b"b": 1, b"B": 1, b"U": 2, b"u": 2, b"s": 2, b"I": 4, b"i": 4, b"L": 8,
          b"l": 8, b"f": 4, b"d": 8, b"D": 5, b"T": 8, b"V": 0}
_NAMES = {b"T": "timestamp", b"d": "double", b"f": "float", b"D": "decimal", b"F": "table",
          b"A": "array", b"S": "string", b"x": "byte array"}
_RAW = {b"T": ">Q", b"d": ">d", b"f": ">f"}

# The basic class's properties in wire order: (attribute, flag bit, how it is encoded).
_FIELDS = (("content_type", 1 << 15, "s"), ("content_encoding", 1 << 14, "s"),
           ("headers", 1 << 13, "F"), ("delivery_mode", 1 << 12, "B"),
           ("priority", 1 << 11, "B"), ("correlation_id", 1 << 10, "s"),
           ("reply_to", 1 << 9, "s"), ("expiration", 1 << 8, "s"),
           ("message_id", 1 << 7, "s"), ("timestamp", 1 << 6, "Q"), ("type", 1 << 5, "s"),
           ("user_id", 1 << 4, "s"), ("app_id", 1 << 3, "s"), ("cluster_id", 1 << 2, "s"))


class Undecodable(str):
    """Stands in for a header value pika could not decode. A str, so that pika
    encodes it as a plain string on the dead-letter copy and decodes it later."""
    __slots__ = ()


class _Cut(Exception):
    """The bytes end before the field does."""


def install() -> None:
    """Guard pika's content-header decode in this process; idempotent.

    Called by every process that consumes or gets messages (worker, workqctl dead,
    workq-submit --requeue-dead) before it connects. Wrapping the class attribute
    covers every BasicProperties pika builds, on any connection adapter."""
    cls = spec.BasicProperties
    if getattr(cls.decode, "workq_guard", False):
        return
    original = cls.decode

    def decode(self, encoded, offset=0):
        try:
            original(self, encoded, offset)
        except Exception:     # RecursionError, ValueError, struct.error, pika's own
            salvage(self, encoded, offset)
            return self
        if len(encoded) - offset > DEEP_GATE and self.headers and _too_deep(self.headers):
            salvage(self, encoded, offset)   # pika managed, but no copy could be encoded
        return self

    decode.workq_guard = True
    decode.__doc__ = original.__doc__
    cls.decode = decode


def problems(props) -> list:
    """[(path, why)] for each value the guard replaced; empty when pika decoded it all."""
    return getattr(props, ATTR, None) or []


def describe(found: list, most: int = 5) -> str:
    """One line for x-workq-error and the log: the first ``most`` problems, then a count."""
    text = "; ".join(f"{path}: {why}" for path, why in found[:most])
    return text + (f"; and {len(found) - most} more" if len(found) > most else "")


def salvage(props, encoded: bytes, offset: int = 0) -> None:
    """Decode ``encoded`` into ``props`` as pika would, replacing what it cannot read."""
    found: list = []
    for name, _bit, _kind in _FIELDS:
        setattr(props, name, None)
    try:
        _properties(props, bytes(encoded), offset, found)
    except Exception as e:   # a bug here must not cost the connection either
        found.append(("properties", f"cannot be decoded ({type(e).__name__}: {e})"))
    setattr(props, ATTR, found)


def _properties(props, buf: bytes, offset: int, found: list) -> None:
    flags, word = 0, 0
    while True:
        if offset + 2 > len(buf):
            found.append(("properties", "the property flags are cut short"))
            return
        partial = struct.unpack_from(">H", buf, offset)[0]
        offset += 2
        flags |= partial << (word * 16)
        if not partial & 1:
            break
        word += 1
    for name, bit, kind in _FIELDS:
        if not flags & bit:
            continue
        try:
            if kind == "F":
                value, offset = _table(buf, offset, len(buf), name, 1, found)
            elif kind == "s":
                value, offset = _shortstr(buf, offset, len(buf))
            else:
                size = struct.calcsize(">" + kind)
                if offset + size > len(buf):
                    raise _Cut
                value = struct.unpack_from(">" + kind, buf, offset)[0]
                offset += size
        except _Cut:
            found.append((name, "the properties end before this one does"))
            return
        setattr(props, name, value)


def _shortstr(buf: bytes, offset: int, limit: int) -> tuple:
    if offset >= limit or offset + 1 + buf[offset] > limit:
        raise _Cut
    return data.decode_short_string(buf, offset)


def _extent(buf: bytes, offset: int, limit: int, path: str, what: str,
            found: list) -> tuple[int, int]:
    """(start, end) of a table's or array's contents after its 4-byte size; a size that
    runs past ``limit`` is noted and cut there."""
    if offset + 4 > limit:
        raise _Cut
    size = struct.unpack_from(">I", buf, offset)[0]
    offset += 4
    end = offset + size
    if end > limit:
        found.append((path, f"the {what} says {size} bytes, only {limit - offset} follow"))
        end = limit
    return offset, end


def _table(buf: bytes, offset: int, limit: int, path: str, depth: int, found: list) -> tuple:
    """(dict, offset after the table); the table's declared size is trusted to find its
    end, so one bad value costs at most the rest of its own table."""
    offset, end = _extent(buf, offset, limit, path, "table", found)
    out = {}
    while offset < end:
        try:
            key, offset = _shortstr(buf, offset, end)
        except _Cut:
            found.append((path, "a key is cut short"))
            break
        where = f"{path}.{key if isinstance(key, str) else repr(key)}"
        out[key], offset, rest_lost = _value(buf, offset, end, where, depth, found)
        if rest_lost:
            break
    return out, end


def _array(buf: bytes, offset: int, limit: int, path: str, depth: int, found: list) -> tuple:
    offset, end = _extent(buf, offset, limit, path, "array", found)
    out = []
    while offset < end:
        value, offset, rest_lost = _value(buf, offset, end, f"{path}[{len(out)}]", depth, found)
        out.append(value)
        if rest_lost:
            break
    return out, end


def _value(buf: bytes, offset: int, limit: int, path: str, depth: int, found: list) -> tuple:
    """(value, offset after it, whether the rest of the enclosing table is lost)."""
    kind = buf[offset:offset + 1]
    if not kind:
        return _bad(found, path, kind, "is missing"), limit, True
    if kind in (b"F", b"A"):
        if depth >= MAX_DEPTH:
            if offset + 5 > limit:
                return _bad(found, path, kind, "is cut short"), limit, True
            size = struct.unpack_from(">I", buf, offset + 1)[0]
            end = offset + 5 + size
            marker = _bad(found, path, kind, f"of {size} bytes is nested deeper than "
                                             f"{MAX_DEPTH} levels")
            return marker, min(end, limit), end > limit
        try:
            decode = _table if kind == b"F" else _array
            value, offset = decode(buf, offset + 1, limit, path, depth + 1, found)
            return value, offset, False
        except _Cut:
            return _bad(found, path, kind, "is cut short"), limit, True
    if kind in (b"S", b"x"):
        size = 4 + (struct.unpack_from(">I", buf, offset + 1)[0] if offset + 5 <= limit else 0)
    else:
        size = _FIXED.get(kind)
    if size is None:
        return _bad(found, path, kind, f"has unknown field type {kind!r}; the rest of its "
                                       f"table cannot be read"), limit, True
    end = offset + 1 + size
    if end > limit:
        return _bad(found, path, kind, "is cut short"), limit, True
    try:
        value, _ = data.decode_value(buf, offset)   # in bounds: checked above
    except Exception as e:
        fmt = _RAW.get(kind)
        raw = struct.unpack_from(fmt, buf, offset + 1)[0] if fmt else buf[offset + 1:end].hex()
        return _bad(found, path, kind, f"{raw} cannot be decoded ({e})"), end, False
    return value, end, False


def _bad(found: list, path: str, kind: bytes, why: str) -> Undecodable:
    what = _NAMES.get(kind, "value")
    found.append((path, f"{what} {why}"))
    return Undecodable(f"undecodable {what}: {why}"[:200])


def _too_deep(headers: dict) -> bool:
    """Whether a container in ``headers`` sits deeper than MAX_DEPTH; no recursion."""
    stack = [(headers, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if type(value) is dict else value
        for child in children:
            if type(child) is dict or type(child) is list:
                if depth >= MAX_DEPTH:
                    return True
                stack.append((child, depth + 1))
    return False


def safe_headers(headers, depth: int = 1):
    """A copy of decoded headers that pika can encode: anything it could not (an
    unexpected type, nesting past MAX_DEPTH) is replaced by a description."""
    if not isinstance(headers, dict):
        return {}
    out = {}
    for k, v in headers.items():
        key = k if isinstance(k, str) else repr(k)[:255]   # a short string on the wire
        out[key] = _safe(v, depth)
    return out


def _safe(value, depth: int):
    if value is None or isinstance(value, (str, bytes, bool, decimal.Decimal,
                                           datetime.datetime)):
        return value   # what pika decoded and encodes alike
    if isinstance(value, int):
        return value if -(1 << 63) <= value < 1 << 63 else Undecodable(str(value))
    if isinstance(value, (dict, list)):
        if depth >= MAX_DEPTH:
            return Undecodable(f"undecodable {type(value).__name__}: nested deeper than "
                               f"{MAX_DEPTH} levels")
        if isinstance(value, dict):
            return safe_headers(value, depth + 1)
        return [_safe(v, depth + 1) for v in value]
    text = repr(value)
    return Undecodable(text if len(text) <= 200 else text[:197] + "...")
