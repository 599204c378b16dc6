"""Plain pika publishers: the W4 baselines, and the bench's own queue filler.

    python pika_publish.py --mode pipelined|one-at-a-time --queue Q --file PATH

publishes one persistent message per non-empty line and prints one JSON line
({"published": n, "confirmed": n, "seconds": s}) where ``seconds`` is measured
inside the process, from before the connection opens to the last confirm.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

import pika
from pika.adapters.select_connection import IOLoop

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
PERSISTENT = pika.BasicProperties(delivery_mode=2)


def submit_properties() -> pika.BasicProperties:
    """What workq-submit sends with each task, so the broker's work per message is the
    same: a message id (a version 7 UUID, whose first 48 bits are the publish time in
    milliseconds), the publish time in whole seconds, a content type."""
    now = time.time()
    mid = f"{int(now * 1000):012x}7{uuid.uuid4().hex[13:16]}8{uuid.uuid4().hex[17:]}"
    return pika.BasicProperties(delivery_mode=2, message_id=mid,
                                timestamp=int(now), content_type="text/plain")


def publish_pipelined(url: str, queue: str, items, window: int = 1000,
                      mandatory: bool = False) -> int:
    """Publish (body, properties) pairs with up to ``window`` unconfirmed at once.

    Returns how many the broker confirmed (acked); raises if it could not connect.
    """
    items = list(items)
    ioloop = IOLoop()
    state = {"next": 0, "seq": 0, "low": 1, "acked": 0, "nacked": 0, "error": None}
    unconfirmed: set[int] = set()
    holder = {}

    def pump():
        ch = holder["ch"]
        while state["next"] < len(items) and len(unconfirmed) < window:
            body, props = items[state["next"]]
            ch.basic_publish("", queue, body, props, mandatory)
            state["next"] += 1
            state["seq"] += 1
            unconfirmed.add(state["seq"])
        if state["next"] >= len(items) and not unconfirmed:
            holder["conn"].close()

    def on_confirm(frame):
        m = frame.method
        ok = isinstance(m, pika.spec.Basic.Ack)
        tags = range(state["low"], m.delivery_tag + 1) if m.multiple else (m.delivery_tag,)
        for t in tags:
            if t in unconfirmed:
                unconfirmed.discard(t)
                state["acked" if ok else "nacked"] += 1
        if m.multiple:
            state["low"] = m.delivery_tag + 1
        if len(unconfirmed) <= window // 2 or state["next"] >= len(items):
            pump()

    def on_channel(ch):
        holder["ch"] = ch
        ch.confirm_delivery(on_confirm, callback=lambda _: pump())

    def on_open(conn):
        conn.channel(on_open_callback=on_channel)

    def on_open_error(conn, err):
        state["error"] = err
        ioloop.stop()

    def on_closed(conn, reason):
        ioloop.stop()

    holder["conn"] = pika.SelectConnection(
        pika.URLParameters(url), on_open_callback=on_open, on_open_error_callback=on_open_error,
        on_close_callback=on_closed, custom_ioloop=ioloop)
    ioloop.start()
    if state["error"] is not None:
        raise ConnectionError(f"cannot connect to {url}: {state['error']!r}")
    return state["acked"]


def publish_one_at_a_time(url: str, queue: str, items) -> int:
    """The tutorial's way with confirms: each publish waits for its own confirm."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    n = 0
    for body, props in items:
        ch.basic_publish("", queue, body, props)  # raises if nacked
        n += 1
    conn.close()
    return n


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default=URL)
    p.add_argument("--queue", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--mode", choices=("pipelined", "one-at-a-time"), default="pipelined")
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--as-submit", action="store_true",
                   help="messages with the properties workq-submit gives each task, "
                        "published mandatory as it does")
    a = p.parse_args()
    t0 = time.monotonic()
    with open(a.file, "rb") as f:
        lines = [line for line in f.read().split(b"\n") if line.strip()]
    items = [(line, submit_properties() if a.as_submit else PERSISTENT) for line in lines]
    if a.mode == "pipelined":
        n = publish_pipelined(a.url, a.queue, items, a.window, mandatory=a.as_submit)
    else:
        n = publish_one_at_a_time(a.url, a.queue, items)
    seconds = time.monotonic() - t0
    print(json.dumps({"published": len(items), "confirmed": n, "seconds": seconds}))
    return 0 if n == len(items) else 1


if __name__ == "__main__":
    sys.exit(main())
