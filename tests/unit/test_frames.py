"""The decode guard (workqd/frames.py) on hand-built content headers, no broker.

Each case is the byte string a producer that is not pika could send; the guard
must turn it into properties with a marker where pika raised, keep everything
else as pika decodes it, and leave a copy pika can encode and decode again.
"""

from __future__ import annotations

import struct

import pika
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pika import frame, spec

import rawamqp as r
from workqd import frames, vocab
from workqd.worker import intake

frames.install()

MS_AS_SECONDS = 1 << 40    # 2004-11-03 in milliseconds; read as seconds, year 36812


def decoded(headers: bytes, **props) -> spec.BasicProperties:
    """The properties pika's frame decoder builds from a content header frame."""
    payload = struct.pack(">HHQ", 60, 0, 0) + r.properties(headers=headers, **props)
    raw = struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"
    used, header = frame.decode_frame(raw)
    assert used == len(raw)
    return header.properties


def round_trip(props: spec.BasicProperties) -> spec.BasicProperties:
    """Encode the properties as the dead-letter copy would, and decode them again."""
    copy = pika.BasicProperties(headers=frames.safe_headers(props.headers),
                                message_id=props.message_id)
    return spec.BasicProperties().decode(b"".join(copy.encode()))


BAD = {
    "timestamp": (r.table({"x-foo": r.v_table({"bar": r.v_timestamp(MS_AS_SECONDS)}),
                           "x-after": r.v_str("kept")}),
                  "headers.x-foo.bar", "timestamp 1099511627776 cannot be decoded"),
    "nested": (r.table({"x-deep": r.v_nested(2000), "x-after": r.v_str("kept")}),
               "headers.x-deep" + ".n" * (frames.MAX_DEPTH - 1), "nested deeper than 64"),
    "unknown type": (r.table({"x-after": r.v_str("kept"), "x-u": b"Z\x01\x02"}),
                     "headers.x-u", "unknown field type b'Z'"),
    "nan double": (r.table({"x-n": r.v_double(float("nan")), "x-after": r.v_str("kept")}),
                   "headers.x-n", "double nan cannot be decoded"),
    "infinite double": (r.table({"x-n": r.v_double(float("inf")), "x-after": r.v_str("kept")}),
                        "headers.x-n", "double inf cannot be decoded"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_value_pika_cannot_decode_becomes_a_marker(kind):
    table, path, why = BAD[kind]
    props = decoded(table, message_id="m-1", content_type="text/plain")
    found = frames.problems(props)
    assert [p for p, _ in found] == [path]
    assert why in found[0][1]
    # The other properties and the healthy header are as pika decodes them.
    assert props.message_id == "m-1" and props.content_type == "text/plain"
    assert props.delivery_mode == 2
    assert props.headers["x-after"] == "kept"
    # The copy is publishable and readable by pika, marker and all.
    again = round_trip(props)
    assert not frames.problems(again)
    assert again.headers == props.headers
    task, problem = intake.read_task("q", False, props, b"body")
    assert problem.startswith(path + ": ") and why in problem


def test_an_unknown_type_costs_only_the_rest_of_its_own_table():
    table = r.table({"x-t": r.v_table({"a": r.v_int(1), "b": b"Z\x00", "c": r.v_int(3)}),
                     "x-next": r.v_int(4)})
    props = decoded(table)
    assert props.headers["x-t"]["a"] == 1 and "c" not in props.headers["x-t"]
    assert props.headers["x-next"] == 4


def test_nesting_pika_survives_is_still_bounded():
    props = decoded(r.table({"x-deep": r.v_nested(200)}))
    assert [p for p, _ in frames.problems(props)] == [
        "headers.x-deep" + ".n" * (frames.MAX_DEPTH - 1)]
    assert not frames.problems(round_trip(props))


def test_nesting_up_to_the_bound_is_left_alone():
    props = decoded(r.table({"x-deep": r.v_nested(frames.MAX_DEPTH - 1)}))
    assert not frames.problems(props)
    value, depth = props.headers["x-deep"], 1
    while isinstance(value, dict):
        value, depth = value["n"], depth + 1
    assert depth == frames.MAX_DEPTH


def test_arrays_are_walked_and_named_by_index():
    arr = b"A" + r.longstr(r.v_int(7) + r.v_timestamp(MS_AS_SECONDS) + r.v_int(9))
    props = decoded(r.table({"x-list": arr}))
    assert props.headers["x-list"][0] == 7 and props.headers["x-list"][2] == 9
    assert [p for p, _ in frames.problems(props)] == ["headers.x-list[1]"]


def test_a_truncated_table_keeps_what_is_there():
    table = struct.pack(">I", 500) + r.shortstr("x-t") + r.v_str("abc")
    props = decoded(table, message_id="m-2")
    assert props.headers["x-t"] == "abc"
    found = frames.problems(props)
    assert found[0] == ("headers", "the table says 500 bytes, only 17 follow")
    # The table ran to the end: nothing after it can be read, and that is said too.
    assert props.message_id is None
    assert ("delivery_mode", "the properties end before this one does") in found


def test_properties_pika_decodes_pay_no_marker():
    props = decoded(r.table({"x-a": r.v_str("x"), "x-d": r.v_decimal(255, -2**31),
                             "x-t": r.v_timestamp(1_700_000_000)}), message_id="m")
    assert not frames.problems(props)
    assert props.headers["x-a"] == "x"


def test_every_decimal_pika_can_decode_round_trips():
    # Decimals are not a decode hazard in any pika this runs on: each scale 0-255.
    for scale in range(256):
        for raw in (0, 1, -1, 2**31 - 1, -2**31):
            props = decoded(r.table({"x-d": r.v_decimal(scale, raw)}))
            assert not frames.problems(props)
            assert round_trip(props).headers == props.headers


def test_many_bad_values_make_one_bounded_line():
    props = decoded(r.table({f"x-{i}": r.v_timestamp(MS_AS_SECONDS) for i in range(300)}))
    assert len(frames.problems(props)) == 300
    _, problem = intake.read_task("q", False, props, b"")
    assert problem.count("timestamp") == 5 and problem.endswith("; and 295 more")


def test_install_is_idempotent():
    wrapped = spec.BasicProperties.decode
    frames.install()
    frames.install()
    assert spec.BasicProperties.decode is wrapped and wrapped.workq_guard


def test_a_non_utf8_key_is_named_and_kept():
    body = r.shortstr(b"x-\xff") + r.v_timestamp(MS_AS_SECONDS)
    props = decoded(struct.pack(">I", len(body)) + body)
    assert frames.problems(props)[0][0] == "headers.b'x-\\xff'"


def test_a_header_intake_chokes_on_is_malformed_not_an_exception():
    props = pika.BasicProperties(headers={vocab.H_ATTEMPT: "²"}, message_id="m")
    task, problem = intake.read_task("q", False, props, b"")
    assert vocab.H_ATTEMPT in problem and task.attempt == 1


def test_an_unreadable_task_keeps_headers_pika_can_encode():
    class Odd:
        def __repr__(self):
            return "<odd>"
    props = pika.BasicProperties(headers={"a": Odd(), "b": [1, {"c": 1 << 70}], b"k": 2},
                                 message_id="m")
    task, problem = intake.unreadable_task("q", True, props, b"x", KeyError("boom"))
    assert problem == "headers cannot be read (KeyError: 'boom')"
    assert task.message_id == "m" and task.redelivered
    assert task.headers == {"a": "<odd>", "b": [1, {"c": str(1 << 70)}], "b'k'": 2}
    pika.BasicProperties(headers=task.headers).encode()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_after_the_flags_decode_without_raising(tail):
    # Whatever follows the header flag: properties (maybe with markers), never an exception.
    props = spec.BasicProperties().decode(struct.pack(">H", 1 << 13 | 1 << 7) + tail)
    assert round_trip(props).headers == frames.safe_headers(props.headers)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"T", b"d", b"f", b"Z", b"F", b"A", b"S", b"l", b"D"]),
                max_size=12), st.binary(max_size=64))
def test_tables_of_hostile_values_keep_the_copy_publishable(kinds, filler):
    body = b"".join(r.shortstr(f"k{i}") + k + filler for i, k in enumerate(kinds))
    props = decoded(struct.pack(">I", len(body)) + body, message_id="m")
    again = round_trip(props)
    assert not frames.problems(again)
    # Keys, not values: pika 1.2.0 writes a negative long and reads it back unsigned.
    assert set(again.headers or {}) == set(frames.safe_headers(props.headers))
