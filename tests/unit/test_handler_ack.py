"""The handler thread's own ack at prefetch 1 (Settler.ack_from_handler) against the I/O
thread's decisions: a channel that closed, a task given up on as timed out or cancelled.

pika's real transport on a fake socket (tests/unit/test_eagerio.py), a real Settler,
and real threads where the point is the race.
"""

from __future__ import annotations

import threading
import types

import pika
import pika.frame
import pika.spec
from hypothesis import given, settings, strategies as st

from workqd import eagerio
from workqd.runner import Task
from workqd.worker.settle import Settler, ack_frame

from .test_eagerio import Connection, FakeSocket, transport


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=65535), st.integers(min_value=1, max_value=2**64 - 1))
def test_the_ack_frame_is_byte_for_byte_what_pika_writes(channel, tag):
    assert ack_frame(channel, tag) == pika.frame.Method(
        channel, pika.spec.Basic.Ack(delivery_tag=tag, multiple=False)).marshal()


COUNTED: list[int] = []   # tags counted by the handler thread's ack


class Channel:
    channel_number = 7
    is_open = True

    def __init__(self):
        self.acks = []

    def basic_ack(self, tag, multiple=False):
        self.acks.append(tag)


def settler(room=None):
    sock = FakeSocket(room=room)
    t, poller, _ = transport(sock)
    io = eagerio.install(Connection(t))
    channel = Channel()
    s = Settler(channel, None, 1, lambda: True, None, None, io)
    return s, sock, t, poller, channel


def delivery(s, tag):
    return s.receive(tag, b"", pika.BasicProperties(), Task(f"m{tag}", "q", {}, False, 0, 1))


def test_a_success_at_prefetch_1_is_acked_by_the_handler_thread_and_settled_once():
    s, sock, t, poller, channel = settler()
    assert s.direct_ack
    d = delivery(s, 3)
    s.ack_from_handler(d, lambda: COUNTED.append(d.tag))
    assert d.acked and bytes(sock.sent) == ack_frame(7, 3)
    assert d.counted and COUNTED[-1] == 3   # counted before the frame left
    assert not s.abandon(d)        # its result is on its way: no timeout copy for it
    s.acked_by_handler(d)
    assert not s.pending
    assert channel.acks == [] and bytes(sock.sent) == ack_frame(7, 3)   # no second ack


def test_a_task_given_up_on_is_never_acked_by_its_late_handler():
    s, sock, *_ = settler()
    d = delivery(s, 4)
    assert s.abandon(d)
    s.ack_from_handler(d, lambda: COUNTED.append(d.tag))
    assert not d.acked and not d.counted and sock.sent == b"" and 4 not in COUNTED


def test_no_ack_after_the_channel_closed():
    s, sock, *_ = settler()
    d = delivery(s, 5)
    s.close()
    s.ack_from_handler(d, lambda: COUNTED.append(d.tag))
    assert not d.acked and sock.sent == b""


def test_no_ack_once_pika_began_tearing_the_connection_down():
    s, sock, t, *_ = settler()
    d = delivery(s, 6)
    t._initiate_abort(None)          # what pika calls first on any loss or close
    s.ack_from_handler(d, lambda: COUNTED.append(d.tag))
    assert not d.acked and sock.sent == b""


def test_no_ack_while_pika_holds_bytes_it_has_not_sent():
    s, sock, t, poller, _ = settler(room=0)
    t.write(b"heartbeat")            # the socket is full: pika buffers it
    d = delivery(s, 8)
    s.ack_from_handler(d, lambda: COUNTED.append(d.tag))
    assert not d.acked               # the I/O thread acks it, after pika's bytes


def test_a_partial_send_is_finished_by_the_io_thread_before_anything_else():
    sizes = iter([5])
    s, sock, t, poller, _ = settler(room=lambda: next(sizes, None))
    d = delivery(s, 9)
    s.ack_from_handler(d, lambda: COUNTED.append(d.tag))
    assert d.acked and bytes(sock.sent) == ack_frame(7, 9)[:5]
    s.acked_by_handler(d)            # the I/O thread settles it: the rest goes out first
    t.write(b"next")
    assert bytes(sock.sent) == ack_frame(7, 9) + b"next"


def test_a_partial_send_goes_ahead_of_the_io_threads_next_write_too():
    sizes = iter([3])
    s, sock, t, poller, _ = settler(room=lambda: next(sizes, None))
    d = delivery(s, 10)
    s.ack_from_handler(d, lambda: COUNTED.append(d.tag))
    t.write(b"heartbeat")            # pika writes before the result is read
    assert bytes(sock.sent) == ack_frame(7, 10) + b"heartbeat"


def test_a_send_that_fails_after_the_count_leaves_the_ack_to_the_io_thread():
    class Reset(FakeSocket):
        def send(self, data):
            raise ConnectionResetError(104, "Connection reset by peer")
    sock = Reset()
    t, *_ = transport(sock)
    s = Settler(Channel(), None, 1, lambda: True, None, None, eagerio.install(Connection(t)))
    d = delivery(s, 11)
    s.ack_from_handler(d, lambda: COUNTED.append(d.tag))
    assert d.counted and not d.acked   # the I/O thread acks it and does not count it again


def test_a_tls_connection_keeps_every_ack_on_the_io_thread():
    io = eagerio.install(types.SimpleNamespace(_transport=object()))
    s = Settler(Channel(), None, 1, lambda: True, None, None, io)
    assert not s.direct_ack
    d = delivery(s, 1)
    assert s.abandon(d) and d.abandoned


def test_prefetch_above_1_keeps_acks_coalesced_on_the_io_thread():
    sock = FakeSocket()
    t, *_ = transport(sock)
    s = Settler(Channel(), None, 25, lambda: True, None, None, eagerio.install(Connection(t)))
    assert not s.direct_ack


def test_racing_threads_either_ack_or_give_up_never_both():
    """The handler thread's ack against the I/O thread's timeout, started together a few
    thousand times: each task ends acked or abandoned, and exactly the acked ones are
    on the wire, once each."""
    s, sock, *_ = settler()
    acked_tags, abandoned = [], 0
    COUNTED.clear()
    for tag in range(1, 2001):
        d = delivery(s, tag)
        go = threading.Barrier(2)
        results = {}

        def handler_side():
            go.wait()
            s.ack_from_handler(d, lambda: COUNTED.append(d.tag))

        def io_side():
            go.wait()
            results["abandoned"] = s.abandon(d)

        threads = [threading.Thread(target=handler_side), threading.Thread(target=io_side)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(5)
        assert d.acked != results["abandoned"] and d.acked != d.abandoned, tag
        if d.acked:
            acked_tags.append(tag)
        assert d.counted == d.acked
        abandoned += d.abandoned
    assert len(acked_tags) + abandoned == 2000
    assert bytes(sock.sent) == b"".join(ack_frame(7, tag) for tag in acked_tags)
    assert COUNTED == acked_tags
