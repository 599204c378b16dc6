"""The behaviour suite on Debian 13 trixie's stack: runs tests/system/trixie-suite.sh.

Python 3.13 and trixie's python3-pika 1.3.2, python3-prometheus-client 0.21,
python3-sdnotify and python3-yaml, against trixie's RabbitMQ 4.0.5, inside a
booted trixie container with a private network. Needs root; in CI
it fails rather than skips when it cannot run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .test_system import need_root

RUN = Path(__file__).resolve().parent / "trixie-suite.sh"
# Cold cache: a debootstrap of trixie with RabbitMQ, then the suite itself.
TIMEOUT = 1500


@pytest.mark.system
def test_behaviour_suite_on_trixie_with_rabbitmq_4():
    need_root()
    proc = subprocess.run(["bash", str(RUN)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    print(proc.stdout)
    assert proc.returncode == 0, (f"tests/system/trixie-suite.sh exited {proc.returncode}:\n"
                                  f"{proc.stdout[-8000:]}")
