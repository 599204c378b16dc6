"""The delay levels seen from a running daemon: /metrics and workqctl status count the
tasks that wait in them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import BROKER_URL, ROOT, queue_config, wait_for
from workqd.client import Client


def test_a_waiting_delayed_task_shows_in_metrics_and_status(daemon, qname, tmp_path):
    sock = str(tmp_path / "c.sock")
    d = daemon([queue_config(qname, workers=1)], control={"socket": sock})
    client = Client(BROKER_URL)
    try:
        client.submit(b"in an hour", queue=qname, delay=3600)
    finally:
        client.close()
    wait_for(lambda: d.metrics().get("workqd_delayed_messages", 0) >= 1, 20,
             what="workqd_delayed_messages >= 1")
    r = subprocess.run([sys.executable, "-m", "workqd.ctl", "--socket", sock, "status",
                        "--json"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["delayed"] >= 1
    text = subprocess.run([sys.executable, "-m", "workqd.ctl", "--socket", sock, "status"],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    assert "delayed tasks (every queue of the vhost, in the delay levels):" in text
