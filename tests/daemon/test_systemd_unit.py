"""The shipped unit passes systemd-analyze verify and rates an exposure of at most 2.5."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    prefix = Path(sys.executable).parent.parent.parent  # the checkout whose .venv runs the tests
    path = tmp_path / "edgevl.service"
    path.write_text((ROOT / "systemd/edgevl.service").read_text().replace("@PREFIX@", str(prefix)))
    return path


def test_unit_verifies(unit: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "edgevl.service" not in proc.stderr, proc.stderr  # no warnings about our unit


def test_unit_exposure_is_low(unit: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=25", str(unit)],
                          capture_output=True, text=True, check=False)
    match = re.search(r"Overall exposure level for edgevl\.service: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.5
    assert proc.returncode == 0


def test_unit_is_notify_with_watchdog_and_check() -> None:
    text = (ROOT / "systemd/edgevl.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "ExecStartPre=@PREFIX@/.venv/bin/edgevl check",
                 "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure", "RestartPreventExitStatus=2",
                 "StateDirectory=edgevl",
                 "ProtectSystem=strict", "MemoryMax=", "Delegate=memory", "KillMode=mixed"):
        assert line in text


def test_the_install_script_parses_and_refuses_a_non_root_user(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "install"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, check=False).returncode == 0
    # As an unprivileged user it changes nothing and says why.
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(script)],
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "scripts/install: run as root"
