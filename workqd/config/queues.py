"""The reader of one entry of ``queues``, and the checks across queues.

Simple keys come from the schema; here is what needs code: the name, the
handler, ``workers`` as a number or ``{min, max, idle_after}``, retry's two
backoff forms, and the keys for queues owned by others (arguments, bindings).
"""

from __future__ import annotations

from typing import Any

from .. import vocab
from . import schema
from .convert import is_number, queue_name, seconds, whole
from .errors import Invalid, number, show
from .handler import handler
from .limits import DEFAULT_JITTER, MAX_ATTEMPTS, MAX_BACKOFF, MAX_NAME_BYTES, OWNED_ARGUMENTS
from ..limits import RateError, longest_name, parse_rate
from .model import Autoscale, Binding, Limits, Queue, Retry
from .reader import Reader

_WHOLE_ARGUMENTS = {"x-max-length": whole(0), "x-max-length-bytes": whole(0),
                    "x-max-priority": whole(1, 255), "x-expires": whole(1),
                    "x-single-active-consumer": schema.converter("queues[].declare")}


def queue(r: Reader, raw: Any, i: int) -> Queue | None:
    key = f"queues[{i}]"
    if not isinstance(raw, dict):
        r.problem(key, f"must be a mapping with at least name and handler, got {show(raw)}")
        return None
    data = r.section(raw, key, "queues[]")
    name = f"invalid-{i}"
    try:
        name = queue_name(data.get("name"))
    except Invalid as e:
        r.problem(f"{key}.name", "is required" if data.get("name") is None else str(e))
    program = handler(r, data.get("handler"), f"{key}.handler")
    kwargs = r.settings(data, key, "queues[]", workers=workers)
    kwargs.update(_autoscale_fields(kwargs))
    kwargs.update(_ownership(r, data, key, kwargs))
    if data.get("limits") is not None:
        kwargs["limits"] = limits(r, data["limits"], f"{key}.limits", name)
    return Queue(name=name, handler=program, retry=retry(r, data.get("retry"), f"{key}.retry"),
                 **kwargs)


def limits(r: Reader, raw: Any, key: str, name: str) -> Limits:
    """``limits: {concurrency, rate, burst}``; the rate as "50/s", "300/min" or "10/h"."""
    data = r.section(raw, key, "queues[].limits")
    fields = r.settings(data, key, "queues[].limits")
    if data.get("rate") is not None:
        try:
            fields["rate"], fields["rate_text"] = parse_rate(data["rate"])
        except RateError as e:
            r.problem(f"{key}.rate", str(e))
    elif "burst" in fields:
        r.problem(f"{key}.burst", "applies to a rate; set rate too")
    got = Limits(**fields)
    longest = longest_name(name, got.concurrency, got.rate_text, got.burst)
    if len(longest.encode("utf-8")) > MAX_NAME_BYTES:
        r.problem(key, f'the broker name "{longest}" it needs would be longer than '
                  f"{MAX_NAME_BYTES} bytes; shorten the queue's name")
    return got


def workers(value: Any) -> int | Autoscale:
    """A fixed pool size, or ``{min, max[, idle_after]}`` for an autoscaled pool."""
    fixed = schema.BY_PATH["queues[].workers"]
    if not isinstance(value, dict):
        return whole(fixed.low, fixed.high)(value)
    keys = schema.children("queues[].workers")
    unknown = sorted(map(show, set(value) - {k.name for k in keys}))
    if unknown:
        raise Invalid(f"unknown key(s) {', '.join(unknown)} ({', '.join(k.name for k in keys)})")
    if "min" not in value or "max" not in value:
        raise Invalid("an autoscaled pool needs both min and max")
    got = {}
    for k in keys:
        if value.get(k.name) is not None:
            try:
                got[k.name] = schema.converter(k.path)(value[k.name])
            except Invalid as e:
                raise Invalid(f"{k.name} {e}") from None
    lo, hi = got["min"], got["max"]
    if lo > hi:
        raise Invalid(f"min {lo} is above max {hi}")
    return Autoscale(lo, hi, got.get("idle_after", Autoscale.idle_after))


def _autoscale_fields(kwargs: dict) -> dict:
    """An Autoscale read from ``workers`` becomes Queue.autoscale, its min Queue.workers."""
    a = kwargs.get("workers")
    return {"workers": a.min, "autoscale": a} if isinstance(a, Autoscale) else {}


def retry(r: Reader, raw: Any, key: str) -> Retry:
    data = r.section(raw, key, "queues[].retry")
    fields = r.settings(data, key, "queues[].retry")
    raw_backoff = data.get("backoff")
    if isinstance(raw_backoff, dict):
        fields.update(_exponential(r, raw_backoff, f"{key}.backoff",
                                   fields.get("attempts", Retry.attempts)))
    else:
        fields.update(r.fields(data, key, {"backoff": backoff}))
    return Retry(**fields)


def backoff(value: Any) -> tuple[float, ...]:
    """``backoff: [5, 30]`` (or one number): seconds before try 2, 3, ..."""
    if is_number(value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Invalid(f"must be a list of seconds, got {show(value)}")
    if len(value) > MAX_ATTEMPTS:
        raise Invalid(f"must have at most {MAX_ATTEMPTS} values, got {len(value)}")
    convert = seconds(0.001, maximum=MAX_BACKOFF, allow_zero=True)
    out = []
    for j, b in enumerate(value):
        try:
            out.append(convert(b))
        except Invalid as e:
            raise Invalid(f"[{j}] {e}") from None
    return tuple(out)


def _exponential(r: Reader, raw: dict, key: str, attempts: int) -> dict:
    """``backoff: {initial, max, jitter}``: initial, then doubling up to max, each minus a
    random part of up to ``jitter`` of it."""
    data = r.section(raw, key, "queues[].retry.backoff")
    if "initial" not in data:
        r.problem(f"{key}.initial", "is required in the {initial, max, jitter} form")
        return {}
    got = r.settings(data, key, "queues[].retry.backoff")
    if any(name in data and name not in got for name in ("initial", "max", "jitter")):
        return {}   # already reported
    initial = got["initial"]
    most = got.get("max", MAX_BACKOFF)
    if most < initial:
        r.problem(f"{key}.max", f"must be at least initial ({number(initial)}), "
                  f"got {number(most)}")
        return {}
    steps, delay = [], initial
    for _ in range(max(1, attempts - 1)):
        steps.append(min(delay, most))
        delay *= 2
    return {"backoff": tuple(steps), "jitter": got.get("jitter", DEFAULT_JITTER)}


def _ownership(r: Reader, data: dict, key: str, kwargs: dict) -> dict:
    """arguments and bindings, weighed against declare and declare_side_queues."""
    out: dict[str, Any] = {}
    qtype = kwargs.get("type", "quorum")
    if data.get("arguments") is not None:
        out["arguments"] = _arguments(r, data["arguments"], f"{key}.arguments", qtype)
        if out["arguments"] and kwargs.get("declare") is False:
            r.problem(f"{key}.arguments", "has no effect with declare: false (a passive check "
                      "takes the queue as it is)")
    if data.get("bindings") is not None:
        out["bindings"] = _bindings(r, data["bindings"], f"{key}.bindings")
    if (kwargs.get("declare_side_queues") is False and kwargs.get("declare", True)
            and qtype == "quorum"):
        r.problem(f"{key}.declare_side_queues", "false needs declare: false or type: classic: "
                  "a quorum queue workqd declares dead-letters into its .dead queue")
    return out


def _arguments(r: Reader, raw: Any, key: str, qtype: str) -> tuple[tuple[str, Any], ...]:
    args = []
    for name, value in r.mapping(raw, key, None).items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not name.startswith("x-"):
            r.problem(key, f"queue arguments are named x-..., got {show(name)}")
        elif name in OWNED_ARGUMENTS or (name == "x-overflow" and qtype == "quorum"):
            r.problem(where, "is set by workqd itself (type, retry, max_redeliveries); "
                      "leave it out")
        elif name == "x-max-priority" and qtype == "quorum":
            r.problem(where, "applies to classic queues only (type: classic)")
        elif name in _WHOLE_ARGUMENTS:
            try:
                args.append((name, _WHOLE_ARGUMENTS[name](value)))
            except Invalid as e:
                r.problem(where, str(e))
        elif isinstance(value, (bool, str, int)):
            args.append((name, value))
        else:
            r.problem(where, f"must be a string, a whole number or true/false, got "
                      f"{show(value)}")
    return tuple(args)


def _bindings(r: Reader, raw: Any, key: str) -> tuple[Binding, ...]:
    if not isinstance(raw, list):
        r.problem(key, f"must be a list of {{exchange, routing_key}}, got {show(raw)}")
        return ()
    bindings = (_binding(r, b, f"{key}[{j}]") for j, b in enumerate(raw))
    return tuple(b for b in bindings if b is not None)


def _binding(r: Reader, raw: Any, where: str) -> Binding | None:
    b = r.section(raw, where, "queues[].bindings[]")
    exchange = b.get("exchange")
    if exchange is None:
        r.problem(f"{where}.exchange", "is required")
        return None
    if (not isinstance(exchange, str) or not exchange.isprintable()
            or len(exchange.encode("utf-8")) > MAX_NAME_BYTES):
        r.problem(f"{where}.exchange", f"must be an exchange name of at most "
                  f"{MAX_NAME_BYTES} bytes without control characters, got "
                  f"{show(exchange)}")
        return None
    if exchange in ("", "amq.default"):
        r.problem(f"{where}.exchange", "the default exchange routes by queue name "
                  "already and cannot be bound")
        return None
    rk = b.get("routing_key", "")
    if not isinstance(rk, str) or len(rk.encode("utf-8")) > MAX_NAME_BYTES:
        r.problem(f"{where}.routing_key", f"must be a string of at most "
                  f"{MAX_NAME_BYTES} bytes, got {show(rk)}")
        return None
    return Binding(exchange, rk)


def side_queues(q: Queue) -> list[str]:
    """The dead-letter queue, then the names of the per-backoff delay queues of earlier
    versions: no longer declared, but one may still be on the broker, holding tasks."""
    return [q.dead_letter_queue] + [vocab.delay_queue(q.name, d) for d in q.retry.delays()]


def check_names(r: Reader, queues: list[tuple[int, Queue]]) -> None:
    """Unique names; the dead-letter queue within 255 bytes; no side queue's name taken
    by another queue. An old delay queue's name too long for the broker was never
    declared, so it limits neither the name nor the backoff."""
    owner: dict[str, int] = {}
    for i, q in queues:
        if q.name in owner:
            r.problem(f"queues[{i}].name", f'"{q.name}" is already used by queues[{owner[q.name]}]')
        else:
            owner[q.name] = i
    for i, q in queues:
        for k, side in enumerate(side_queues(q)):
            if k == 0 and len(side.encode("utf-8")) > MAX_NAME_BYTES:
                r.problem(f"queues[{i}].name", f'its side queue "{side}" would be longer than '
                          f"{MAX_NAME_BYTES} bytes; shorten the name")
            elif side in owner:
                r.problem(f"queues[{owner[side]}].name", f'"{side}" is a side queue of '
                          f"queues[{i}] ({q.name})")
