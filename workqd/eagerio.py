"""Socket I/O for pika's plain TCP transport without its extra loop turns.

pika's asynchronous transport never sends from ``write()``: it buffers the
frame, asks the poller to watch the socket for writability (one epoll_ctl),
sends on the next turn of the loop, then stops watching (another epoll_ctl).
And it reads until the socket says EAGAIN, so every read event costs one
``recv`` more than the data needs, raising an exception pika then catches.
A worker at prefetch 1 pays both for every task, on the path between one
task's ack and the next delivery; a plain pika consumer pays them too, but it
has no thread hand-offs to make up for.

``install`` changes two things on one open connection's transport, and only
while pika's transport looks the way this module expects (else it leaves it be):

- a write with nothing buffered ahead of it goes to the socket at once, so bytes
  still leave in the order pika wrote them; whatever the socket does not take
  at once (a full send buffer, an error) goes through pika's own buffered path,
  which sends it on the next turn or meets the error as it always would;
- a read that returns less than a full buffer ends the read event: the kernel
  gave everything it had, and the poller is level-triggered, so bytes that come
  later wake the loop again.

TLS transports keep pika's path: a TLS socket may need a read before it can
write (and the reverse), which pika's SSL transport tracks itself.
"""

from __future__ import annotations

import contextlib
import threading

from pika.adapters.utils import io_services_utils as _pika_io


_PLAIN = getattr(_pika_io, "_AsyncPlaintextTransport", None)
# What install() relies on, checked once per connection (pika 1.2 to 1.4 have it all).
_NEEDED = ("_sock", "_state", "_STATE_ACTIVE", "_protocol", "_tx_buffered_byte_count",
           "_MAX_RECV_BYTES", "_MAX_CONSUME_BYTES", "RxEndOfFile", "write", "_consume",
           "_initiate_abort")


PIECE = 64 << 10   # bytes joined into one send at most when a corked burst is written


class Transport:
    """One open connection's transport, changed as the module says (``direct``), or
    left as pika made it. Lives and dies with its connection.

    Every write of pika's goes through ``write`` on the loop's thread. One other
    thread may send a whole frame of its own with ``send_now``: ``lock`` keeps the
    two from interleaving, and ``open`` turns false under it before pika tears the
    socket down, so a late ``send_now`` cannot reach a closed (or reused) socket."""

    def __init__(self, connection):
        transport = getattr(connection, "_transport", None)
        self.direct = (_PLAIN is not None and type(transport) is _PLAIN
                       and all(hasattr(transport, name) for name in _NEEDED))
        self.lock = threading.Lock()
        self.open = self.direct
        if not self.direct:
            return
        self._transport = transport
        # What the socket did not take of a frame ``send_now`` began: it goes out
        # first, ahead of anything written after it.
        self._rest = b""
        self._buffered_write = transport.write
        transport.write = self.write = self._direct_writer(transport)
        transport._consume = _short_reader(transport)
        abort = transport._initiate_abort

        def initiate_abort(error) -> None:
            with self.lock:
                self.open = False
            abort(error)
        transport._initiate_abort = initiate_abort

    def _direct_writer(self, transport):
        send = transport._sock.send
        active = transport._STATE_ACTIVE
        buffered_write = self._buffered_write
        lock = self.lock

        def write(data: bytes) -> None:
            with lock:
                if self._rest:
                    data, self._rest = self._rest + data, b""
                if transport._tx_buffered_byte_count == 0 and transport._state == active \
                        and data:
                    try:
                        sent = send(data)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:
                        buffered_write(data)   # pika's path meets the error, closes as it would
                        return
                    if sent == len(data):
                        return
                    data = data[sent:]
                if data:
                    buffered_write(data)
        return write

    def send_now(self, frame: bytes, wanted) -> bool:
        """Send one whole frame from a thread other than the loop's, if ``wanted()``
        (called under ``lock``) and nothing of pika's is waiting to go first. True: the
        frame is the broker's, or will be with the loop's next ``flush``, which the
        caller makes happen; False: nothing was sent."""
        with self.lock:
            t = self._transport
            if not self.open or t._state != t._STATE_ACTIVE or t._tx_buffered_byte_count \
                    or self._rest or not wanted():
                return False
            try:
                sent = t._sock.send(frame)
            except OSError:
                return False   # EAGAIN, or an error the loop meets on its next read or write
            if sent < len(frame):
                self._rest = frame[sent:]
            return True

    def flush(self) -> None:
        """On the loop's thread: send what ``send_now`` left over, if anything."""
        if self.direct and self._rest:
            self.write(b"")

    @contextlib.contextmanager
    def corked(self):
        """Hold the frames written inside the block, then write them joined in pieces
        of at most PIECE bytes: a burst of publishes costs a few sends, not three per
        message (pika sends each frame it buffered on its own)."""
        if not self.direct:
            yield
            return
        frames: list[bytes] = []
        self._transport.write = frames.append
        try:
            yield
        finally:
            self._transport.write = self.write
            piece: list[bytes] = []
            size = 0
            for frame in frames:
                piece.append(frame)
                size += len(frame)
                if size >= PIECE:
                    self.write(b"".join(piece))
                    piece, size = [], 0
            if piece:
                self.write(b"".join(piece))


def _short_reader(transport):
    sock_recv, protocol = transport._sock.recv, transport._protocol
    active, chunk = transport._STATE_ACTIVE, transport._MAX_RECV_BYTES
    budget, end_of_file = transport._MAX_CONSUME_BYTES, transport.RxEndOfFile

    def consume() -> None:
        consumed = 0
        while transport._state == active and consumed < budget:
            data = sock_recv(chunk)
            if not data:
                raise end_of_file()
            consumed += len(data)
            protocol.data_received(data)
            if len(data) < chunk:
                return   # drained: the level-triggered poller reports what comes next
    return consume


def install(connection) -> Transport:
    """Direct writes and short reads for ``connection``'s plain TCP transport (``direct``
    False on the returned Transport: pika's own behaviour, for one it does not know)."""
    return Transport(connection)
