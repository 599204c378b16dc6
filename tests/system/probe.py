"""Probes for the system test, on Debian's python3 and python3-pika: run on the
host for a container on the host's network (bookworm), inside the container
for one with a private network and its own broker (trixie).

    probe.py metric [--port N] NAME [LABEL=VALUE ...]   print the sum of matching samples
    probe.py http [--port N] PATH                       print the HTTP status of GET PATH
    probe.py purge QUEUE                               empty QUEUE on 127.0.0.1 if it exists
    probe.py depth QUEUE                               print QUEUE's ready messages and consumers
    probe.py malformed QUEUE ID                        publish task ID with an unreadable
                                                       x-workq-attempt (dead-lettered unrun)

``metric`` prints "none" and exits 1 when /metrics does not answer, so a poll
loop can tell "not up yet" from "zero".
"""

from __future__ import annotations

import re
import sys
import urllib.error
import urllib.request

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric(args: list[str]) -> int:
    port = 9464
    if args[:1] == ["--port"]:
        port, args = int(args[1]), args[2:]
    name, wanted = args[0], dict(a.split("=", 1) for a in args[1:])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        print("none")
        return 1
    total = 0.0
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        labels = dict(LABEL.findall(m.group(2) or ""))
        if all(labels.get(k) == v for k, v in wanted.items()):
            total += float(m.group(3))
    print(int(total) if total.is_integer() else total)
    return 0


def http(args: list[str]) -> int:
    port = 9464
    if args[:1] == ["--port"]:
        port, args = int(args[1]), args[2:]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{args[0]}", timeout=3) as r:
            print(r.status)
    except urllib.error.HTTPError as e:
        print(e.code)
    except OSError:
        print("none")
        return 1
    return 0


def broker(queue: str, purge: bool) -> int:
    import pika
    import pika.exceptions
    conn = pika.BlockingConnection(pika.URLParameters(
        "amqp://guest:guest@127.0.0.1:5672/%2F?connection_attempts=1&socket_timeout=5"))
    try:
        ch = conn.channel()
        try:
            ok = ch.queue_declare(queue, passive=True).method
        except pika.exceptions.ChannelClosedByBroker:
            print(f"{queue}: not declared yet" if purge else "0 0")
            return 0
        if purge:
            ch.queue_purge(queue)
            print(f"{queue}: purged {ok.message_count} message(s)")
        else:
            print(ok.message_count, ok.consumer_count)
    finally:
        conn.close()
    return 0


def malformed(queue: str, message_id: str) -> int:
    import pika
    conn = pika.BlockingConnection(pika.URLParameters(
        "amqp://guest:guest@127.0.0.1:5672/%2F?connection_attempts=1&socket_timeout=5"))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", queue, b"malformed.", pika.BasicProperties(
            delivery_mode=2, message_id=message_id, headers={"x-workq-attempt": "abc"}))
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "malformed":
        sys.exit(malformed(*rest))
    if cmd in ("purge", "depth"):
        sys.exit(broker(rest[0], purge=cmd == "purge"))
    sys.exit({"metric": metric, "http": http}[cmd](rest))
