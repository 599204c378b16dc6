"""The Debian package under a real systemd: runs tests/system/run.sh.

One .deb, built once for the session, is installed in a booted Debian 12
bookworm container (systemd 252, the host's RabbitMQ 3.10) and in a booted
Debian 13 trixie container (systemd 257, its own RabbitMQ 4.0 on a private
network); each checks start, tasks, reload, watchdog, stop, kill -9, purge and
upgrade there. It needs root; in CI it fails rather than skips when it cannot run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "tests" / "system" / "run.sh"
# Cold cache: two package builds and a debootstrap; warm: a minute or two.
TIMEOUT = 1200


def need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the system test needs root (debootstrap, systemd-nspawn, mount)")
        pytest.skip("needs root (debootstrap, systemd-nspawn, mount): sudo make system-test")


@pytest.fixture(scope="session")
def debs(tmp_path_factory) -> Path:
    """Where run.sh builds the .debs on its first run and finds them on the next."""
    return tmp_path_factory.mktemp("debs")


@pytest.mark.system
@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_debian_package_under_systemd(suite, debs):
    need_root()
    env = dict(os.environ)
    # Publish with this environment's workq-submit (the venv tests/run.sh made).
    submit = Path(sys.executable).parent / "workq-submit"
    if "WORKQ_SUBMIT" not in env and submit.exists():
        env["WORKQ_SUBMIT"] = str(submit)
    proc = subprocess.run(["bash", str(RUN), "--suite", suite, "--debs", str(debs)], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    print(proc.stdout)
    assert proc.returncode == 0, f"tests/system/run.sh exited {proc.returncode}:\n{proc.stdout[-6000:]}"
