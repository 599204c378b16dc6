"""A tiny AMQP 0-9-1 publisher on a bare socket, for frames pika would never write,
and a relay that can leave a kind of client frame unanswered.

Tests use it as a producer that is not pika (as a Node.js or Java client would be):
it sends a header table exactly as the test built it, bytes and all, so a value
pika cannot decode reaches the broker and then a pika consumer. Only what a
publisher needs: PLAIN login, one channel, publisher confirms, Basic.Publish.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

FRAME_METHOD, FRAME_HEADER, FRAME_BODY = 1, 2, 3
FRAME_END = b"\xce"
BASIC = 60
QUEUE_DECLARE = (50, 10)   # (class, method)
BASIC_GET = (60, 70)

# Property flag bits of the basic class, in the order the fields follow them.
F_CONTENT_TYPE, F_HEADERS, F_DELIVERY_MODE, F_MESSAGE_ID = 1 << 15, 1 << 13, 1 << 12, 1 << 7


# --- field values: the type byte and its encoding ------------------------------

def shortstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(">B", len(raw)) + raw


def longstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(">I", len(raw)) + raw


def table(fields: dict) -> bytes:
    """A field table from {key: encoded value (type byte first)}."""
    body = b"".join(shortstr(k) + v for k, v in fields.items())
    return struct.pack(">I", len(body)) + body


def v_str(text: str) -> bytes:
    return b"S" + longstr(text)


def v_int(n: int) -> bytes:
    return b"l" + struct.pack(">q", n)


def v_timestamp(seconds: int) -> bytes:
    return b"T" + struct.pack(">Q", seconds)


def v_double(x: float) -> bytes:
    return b"d" + struct.pack(">d", x)


def v_decimal(scale: int, raw: int) -> bytes:
    return b"D" + struct.pack(">Bi", scale, raw)


def v_table(fields: dict) -> bytes:
    return b"F" + table(fields)


def v_nested(depth: int, leaf: bytes = b"V") -> bytes:
    """Tables nested ``depth`` deep, each holding the next under key "n"."""
    value = leaf
    for _ in range(depth):
        value = v_table({"n": value})
    return value


def properties(headers: bytes | None = None, message_id: str | None = None,
               content_type: str | None = None, delivery_mode: int | None = 2) -> bytes:
    """The property flags and fields of a content header; ``headers`` is an encoded table."""
    flags, out = 0, b""
    if content_type is not None:
        flags |= F_CONTENT_TYPE
        out += shortstr(content_type)
    if headers is not None:
        flags |= F_HEADERS
        out += headers
    if delivery_mode is not None:
        flags |= F_DELIVERY_MODE
        out += struct.pack(">B", delivery_mode)
    if message_id is not None:
        flags |= F_MESSAGE_ID
        out += shortstr(message_id)
    return struct.pack(">H", flags) + out


# --- the connection ---------------------------------------------------------------

class Refused(Exception):
    """The broker closed the channel or connection; args[0] is its reply text."""


class Publisher:
    def __init__(self, host: str = "127.0.0.1", port: int = 5672, user: str = "guest",
                 password: str = "guest", vhost: str = "/", timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = b""
        self._deadline_s = timeout
        self.sock.sendall(b"AMQP\x00\x00\x09\x01")
        self._expect(0, 10, 10)                                    # Connection.Start
        response = b"\x00" + user.encode() + b"\x00" + password.encode()
        self._method(0, 10, 11, table({}) + shortstr("PLAIN") + longstr(response)
                     + shortstr("en_US"))                          # Start-Ok
        tune = self._expect(0, 10, 30)                             # Tune
        channel_max, frame_max, _heartbeat = struct.unpack_from(">HIH", tune)
        self.frame_max = frame_max or 131072
        self._method(0, 10, 31, struct.pack(">HIH", channel_max, self.frame_max, 0))
        self._method(0, 10, 40, shortstr(vhost) + shortstr("") + b"\x00")   # Open
        self._expect(0, 10, 41)
        self._method(1, 20, 10, shortstr(""))                      # Channel.Open
        self._expect(1, 20, 11)
        self._method(1, 85, 10, b"\x00")                           # Confirm.Select
        self._expect(1, 85, 11)

    def publish(self, routing_key: str, body: bytes, props: bytes, exchange: str = "") -> None:
        """Publish and wait for the broker's confirm; raises Refused on a nack or close."""
        self._method(1, BASIC, 40, struct.pack(">H", 0) + shortstr(exchange)
                     + shortstr(routing_key) + b"\x00")
        self._frame(FRAME_HEADER, 1, struct.pack(">HHQ", BASIC, 0, len(body)) + props)
        step = self.frame_max - 8
        for i in range(0, len(body), step):
            self._frame(FRAME_BODY, 1, body[i:i + step])
        args = self._expect(1, BASIC, None)
        class_method = struct.unpack_from(">HH", args)
        if class_method == (BASIC, 120):
            raise Refused("nacked by the broker")
        if class_method != (BASIC, 80):
            raise Refused(f"unexpected method {class_method}")

    def close(self) -> None:
        try:
            self._method(0, 10, 50, struct.pack(">H", 200) + shortstr("bye")
                         + struct.pack(">HH", 0, 0))
            self._expect(0, 10, 51)
        except (OSError, Refused):
            pass
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- frames ---------------------------------------------------------------

    def _frame(self, kind: int, channel: int, payload: bytes) -> None:
        self.sock.sendall(struct.pack(">BHI", kind, channel, len(payload)) + payload + FRAME_END)

    def _method(self, channel: int, class_id: int, method_id: int, args: bytes) -> None:
        self._frame(FRAME_METHOD, channel, struct.pack(">HH", class_id, method_id) + args)

    def _read_frame(self) -> tuple[int, int, bytes]:
        deadline = time.monotonic() + self._deadline_s
        while True:
            if len(self._buf) >= 7:
                kind, channel, size = struct.unpack_from(">BHI", self._buf)
                if len(self._buf) >= 8 + size:
                    payload = self._buf[7:7 + size]
                    self._buf = self._buf[8 + size:]
                    return kind, channel, payload
            if time.monotonic() > deadline:
                raise TimeoutError("no frame from the broker")
            data = self.sock.recv(65536)
            if not data:
                raise Refused("the broker closed the socket")
            self._buf += data

    def _expect(self, channel: int, class_id: int, method_id: int | None) -> bytes:
        """The next method frame's payload (from the class id on when method_id is
        None, else its arguments); heartbeats and other frames are skipped."""
        while True:
            kind, ch, payload = self._read_frame()
            if kind != FRAME_METHOD:
                continue
            cls, meth = struct.unpack_from(">HH", payload)
            if (cls, meth) in ((10, 50), (20, 40)):               # Connection/Channel.Close
                code = struct.unpack_from(">H", payload, 4)[0]
                text = payload[7:7 + payload[6]].decode("utf-8", "replace")
                raise Refused(f"{code} {text}")
            if method_id is None and ch == channel:
                return payload
            if ch == channel and (cls, meth) == (class_id, method_id):
                return payload[4:]


class Relay:
    """A TCP relay to a broker that, while ``dropping`` is set, passes every frame but
    the clients' method frames of kind ``drop`` (class, method): the connection stays
    up, heartbeats pass, and those calls are never answered. Frames are read whole."""

    def __init__(self, drop: tuple[int, int], host: str = "127.0.0.1", port: int = 5672):
        self.drop = drop
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropping = threading.Event()
        self.dropped = 0
        self._closing = False
        threading.Thread(target=self._accept, name="relay accept", daemon=True).start()

    def close(self) -> None:
        self._closing = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream, timeout=10)
            upstream.settimeout(None)
            threading.Thread(target=self._to_client, args=(upstream, client), daemon=True,
                             name="relay down").start()
            threading.Thread(target=self._from_client, args=(client, upstream), daemon=True,
                             name="relay up").start()

    @staticmethod
    def _to_client(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        src.close()
        dst.close()

    def _from_client(self, client: socket.socket, upstream: socket.socket) -> None:
        def read(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = client.recv(n - len(buf))
                if not chunk:
                    raise EOFError
                buf += chunk
            return buf
        try:
            upstream.sendall(read(8))   # the protocol header
            while True:
                head = read(7)
                kind, _channel, size = struct.unpack(">BHI", head)
                rest = read(size + 1)   # the payload and FRAME_END
                if (kind == FRAME_METHOD and self.dropping.is_set()
                        and struct.unpack_from(">HH", rest) == self.drop):
                    self.dropped += 1
                    continue
                upstream.sendall(head + rest)
        except (OSError, EOFError):
            pass
        client.close()
        upstream.close()
