"""Logs for machines: log.format: json, and journal fields over the native
journal protocol. Real daemon; journald is stood in for by a datagram socket of the
test's own, mounted at journald's path in a mount namespace of the daemon's."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys

import pytest

from conftest import queue_config, wait_for
from workqd import logsetup


def test_json_log_lines_parse_and_carry_queue_and_message_id(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1)], log={"level": "info", "format": "json"})
    mid = amqp.publish(qname, "fail=1")
    wait_for(lambda: mid in d.log() and "dead-lettered" in d.log(), 20, what="task logged")
    d.stop()
    docs = [json.loads(line) for line in d.log().splitlines() if line.strip()]
    assert docs and all(set(doc) >= {"time", "level", "process", "pid", "queue", "message_id",
                                     "event"} for doc in docs)
    about = [doc for doc in docs if doc["message_id"] == mid]
    assert about and all(doc["queue"] == qname for doc in about)
    assert any(doc["level"] == "warning" and "dead-lettered" in doc["event"] for doc in about)
    assert any(doc["process"].startswith("master (pid") and doc["queue"] is None for doc in docs)


def test_journal_datagram_encodes_newlines_with_a_length():
    data = logsetup.journal_datagram({"MESSAGE": "a\nb", "QUEUE": "thumbs"})
    assert data == b"MESSAGE\n" + struct.pack("<Q", 3) + b"a\nb\nQUEUE=thumbs\n"


def _fields(datagram: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", datagram[nl + 1:nl + 9])
            out[line.decode()] = datagram[nl + 9:nl + 9 + n].decode()
            i = nl + 9 + n + 1
    return out


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root for a mount namespace")
def test_under_journald_lines_carry_queue_and_message_id_fields(daemon, amqp, qname, tmp_path):
    sock_path = tmp_path / "journal.sock"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(sock_path))
    journal.settimeout(0.2)
    d = daemon([queue_config(qname, workers=1)], start=False)
    d._log = open(d.log_path, "ab")
    st = os.fstat(d._log.fileno())
    env = {**d.env(), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    # journald's socket path, only for the daemon: a tmpfs over /run in its own namespace.
    script = (f"mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && "
              f"touch /run/systemd/journal/socket && "
              f"mount --bind {sock_path} /run/systemd/journal/socket && "
              f"exec {sys.executable} -m workqd.cli -c {d.path}")
    d.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                              stdout=d._log, stderr=subprocess.STDOUT, env=env)
    d.wait_ready()
    mid = amqp.publish(qname, "fail=1")   # a failure is logged with its message id
    records = []

    def got_task_line():
        try:
            records.append(_fields(journal.recv(1 << 20)))
        except socket.timeout:
            pass
        return any(r.get("WORKQ_MESSAGE_ID") == mid for r in records)
    wait_for(got_task_line, 20, what=lambda: f"a journal record about the task; log:\n{d.log()}")
    journal.close()
    task = [r for r in records if r.get("WORKQ_MESSAGE_ID") == mid]
    assert all(r["QUEUE"] == qname and r["SYSLOG_IDENTIFIER"] == "workqd" for r in task)
    assert any(r["MESSAGE"].startswith("master (pid") and r["PRIORITY"] == "6"
               and "QUEUE" not in r for r in records)
