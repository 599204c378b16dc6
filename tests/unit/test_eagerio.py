"""Direct writes and short reads on pika's own plain TCP transport (workqd/eagerio.py).

The transport is pika's real ``_AsyncPlaintextTransport``; only the socket and the
poller are fakes, so what pika's buffered path does with the leftovers is pika's.
"""

from __future__ import annotations

import itertools
import random
import socket

import pytest
from hypothesis import given, settings, strategies as st
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport

from workqd import eagerio


class FakeSocket:
    """Takes at most ``room`` bytes per send (None: all), or raises EAGAIN when 0."""

    def __init__(self, room=None, incoming=b""):
        self.room = room
        self.sent = bytearray()
        self.sends = 0
        self.incoming = bytearray(incoming)
        self.recvs = 0

    def fileno(self):
        return 99

    def send(self, data):
        self.sends += 1
        room = self.room() if callable(self.room) else self.room
        if room == 0:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        n = len(data) if room is None else min(room, len(data))
        self.sent += bytes(data[:n])
        return n

    def recv(self, n):
        self.recvs += 1
        if self.incoming is None:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        data, self.incoming = bytes(self.incoming[:n]), self.incoming[n:]
        return data


class FakePoller:
    def __init__(self):
        self.writer = None
        self.writer_calls = 0

    def set_reader(self, fd, callback):
        pass

    def set_writer(self, fd, callback):
        self.writer, self.writer_calls = callback, self.writer_calls + 1

    def remove_writer(self, fd):
        self.writer = None

    def remove_reader(self, fd):
        pass

    def add_callback_threadsafe(self, callback):
        pass   # pika's teardown, after the abort: not these tests' subject


class Protocol:
    def __init__(self):
        self.chunks = []

    def data_received(self, data):
        self.chunks.append(data)


class Connection:
    def __init__(self, transport):
        self._transport = transport


def transport(sock):
    poller, protocol = FakePoller(), Protocol()
    t = _AsyncPlaintextTransport(sock, protocol, poller)
    return t, poller, protocol


def drain(t, poller):
    """What pika's loop does while the socket is writable and pika holds bytes."""
    while poller.writer is not None:
        poller.writer()


def test_a_write_with_nothing_buffered_goes_out_at_once_without_the_poller():
    sock = FakeSocket()
    t, poller, _ = transport(sock)
    io = eagerio.install(Connection(t))
    assert io.direct
    t.write(b"ack-frame")
    assert bytes(sock.sent) == b"ack-frame"
    assert poller.writer_calls == 0 and t.get_write_buffer_size() == 0


def test_what_the_socket_does_not_take_goes_through_pika_and_later_writes_queue_behind_it():
    sock = FakeSocket(room=3)
    t, poller, _ = transport(sock)
    eagerio.install(Connection(t))
    t.write(b"abcdefgh")
    assert bytes(sock.sent) == b"abc"
    assert t.get_write_buffer_size() == 5 and poller.writer is not None
    t.write(b"XYZ")              # something is buffered: it must not overtake it
    assert bytes(sock.sent) == b"abc"
    sock.room = None
    drain(t, poller)
    assert bytes(sock.sent) == b"abcdefghXYZ"


def test_a_full_socket_hands_the_whole_write_to_pika():
    sock = FakeSocket(room=0)
    t, poller, _ = transport(sock)
    eagerio.install(Connection(t))
    t.write(b"frame")
    assert t.get_write_buffer_size() == 5 and poller.writer is not None
    sock.room = None
    drain(t, poller)
    assert bytes(sock.sent) == b"frame"


def test_a_socket_error_is_left_to_pikas_path():
    class Broken(FakeSocket):
        def send(self, data):
            raise ConnectionResetError(104, "Connection reset by peer")
    sock = Broken()
    t, poller, _ = transport(sock)
    eagerio.install(Connection(t))
    t.write(b"frame")
    assert t.get_write_buffer_size() == 5 and poller.writer is not None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=30),
       st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=30),
       st.lists(st.booleans(), min_size=1, max_size=30), st.randoms())
def test_bytes_leave_in_the_order_written_whatever_the_socket_takes(writes, rooms, corks, rnd):
    """Random send sizes (EAGAIN included), corked and plain writes, and pika's loop
    draining its buffer at random moments: the peer sees exactly the concatenation."""
    sizes = iter(rooms * 100)
    sock = FakeSocket(room=lambda: next(sizes, None))
    t, poller, _ = transport(sock)
    io = eagerio.install(Connection(t))
    it = iter(writes)
    for cork in corks:
        burst = list(itertools.islice(it, rnd.randint(1, 4)))
        if cork:
            with io.corked():
                for b in burst:
                    t.write(b)
        else:
            for b in burst:
                t.write(b)
        if poller.writer is not None and rnd.random() < 0.5:
            poller.writer()
    for b in it:
        t.write(b)
    sock.room = None
    drain(t, poller)
    assert bytes(sock.sent) == b"".join(writes)


def test_a_corked_burst_is_a_few_sends_and_the_same_bytes():
    sock = FakeSocket()
    t, poller, _ = transport(sock)
    io = eagerio.install(Connection(t))
    frames = [bytes([i % 256]) * random.randint(1, 300) for i in range(3000)]
    with io.corked():
        for f in frames:
            t.write(f)
        assert sock.sends == 0   # nothing leaves inside the block
    assert bytes(sock.sent) == b"".join(frames)
    total = sum(map(len, frames))
    assert sock.sends <= total // eagerio.PIECE + 1
    assert poller.writer_calls == 0


def test_a_corked_block_that_raises_still_writes_what_it_wrote():
    sock = FakeSocket()
    t, poller, _ = transport(sock)
    io = eagerio.install(Connection(t))
    with pytest.raises(RuntimeError):
        with io.corked():
            t.write(b"one")
            raise RuntimeError("encoding failed")
    assert bytes(sock.sent) == b"one"
    t.write(b"two")   # the direct writer is back
    assert bytes(sock.sent) == b"onetwo"


def test_a_short_read_ends_the_read_event():
    sock = FakeSocket(incoming=b"x" * 100)
    t, poller, protocol = transport(sock)
    eagerio.install(Connection(t))
    t._on_socket_readable()
    assert protocol.chunks == [b"x" * 100]
    assert sock.recvs == 1   # pika itself would recv again, for EAGAIN


def test_full_reads_go_on_until_a_short_one():
    chunk = _AsyncPlaintextTransport._MAX_RECV_BYTES
    sock = FakeSocket(incoming=b"y" * (2 * chunk + 7))
    t, poller, protocol = transport(sock)
    eagerio.install(Connection(t))
    t._on_socket_readable()
    assert [len(c) for c in protocol.chunks] == [chunk, chunk, 7]


def test_end_of_file_is_reported_as_pika_reports_it():
    class Protocol2(Protocol):
        eof = 0

        def eof_received(self):
            self.eof += 1
            return False
    sock = FakeSocket(incoming=b"")
    poller, protocol = FakePoller(), Protocol2()
    t = _AsyncPlaintextTransport(sock, protocol, poller)
    eagerio.install(Connection(t))
    aborted = []
    t._initiate_abort = aborted.append
    t._on_socket_readable()
    assert protocol.eof == 1 and aborted == [None]


def test_an_unknown_transport_is_left_as_pika_made_it():
    class Other:
        def write(self, data):
            raise AssertionError("not reached")
    other = Other()
    io = eagerio.install(Connection(other))
    assert not io.direct
    with io.corked():
        pass
    assert type(other).write is Other.write and "write" not in vars(other)


def test_a_tls_transport_keeps_pikas_path():
    from pika.adapters.utils.io_services_utils import _AsyncSSLTransport
    a, b = socket.socketpair()
    try:
        t = _AsyncSSLTransport.__new__(_AsyncSSLTransport)
        t._sock = a
        io = eagerio.install(Connection(t))
        assert not io.direct and "write" not in vars(t)
    finally:
        a.close()
        b.close()
