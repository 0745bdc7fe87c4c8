"""An input in hand at two consecutive deaths of a real ``edgevl run`` is quarantined at the next start."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.harness.daemon import QUESTIONS, RULES, DaemonProcess
from tests.harness.images import encode, noise_image

pytestmark = pytest.mark.slow


def _jpeg(seed: int) -> bytes:
    return encode(noise_image(160, 120, seed=seed), "JPEG")


def _kill_while_copying(d: DaemonProcess, timeout: float = 60) -> dict[str, int]:
    """Start the daemon, kill -9 it while it copies a file into its spool; what it had in hand."""
    d.start()
    assert d.proc is not None
    fds = Path(f"/proc/{d.proc.pid}/fd")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            copying = any(os.readlink(fd).endswith(".copy.part") for fd in fds.iterdir())
        except OSError:
            copying = False  # a descriptor closed while it was looked at
        if copying:
            d.kill()
            return d.in_hand()
        time.sleep(0.002)
    raise AssertionError(f"no copy within {timeout} s:\n{d.log()}")


def test_an_input_in_hand_at_two_deaths_is_quarantined_and_never_met_again(tmp_path: Path, test_model_dir: Path,
                                                                           big_tmpfs: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    share = big_tmpfs / "share"  # another filesystem: the file is copied into the spool, which takes a while
    share.mkdir()
    d.rules_path.write_text(RULES.format(inbox=d.inbox) + f'[[rule]]\nname = "share"\nfolders = ["{share}"]\n'
                            f'patterns = ["*.jpg"]\n{QUESTIONS}')
    with (share / "huge.jpg").open("wb") as f:
        for _ in range(16):
            f.write(b"\xff" * (64 << 20))  # 1 GiB of data, no holes
    # Killed twice while that copy is under way (as the OOM killer or the service watchdog would):
    # first while it is taken, then while the next start copies it in again.
    first = _kill_while_copying(d)
    assert set(first) == {f"file:{share / 'huge.jpg'}", next(k for k in first if k.startswith("job:"))}
    job_key = next(k for k in first if k.startswith("job:"))
    assert not (share / "huge.jpg").exists(), "taken: it waits in the claim folder"
    assert _kill_while_copying(d) == {job_key: 1}, "the same input, one death so far"
    (d.inbox / "after.jpg").write_bytes(_jpeg(5))
    d.start()
    try:
        d.wait_notify("READY=1")
        records = d.wait_records(2)
        by_rule = {r["rule"]: r for r in records}
        quarantined = by_rule["share"]
        assert quarantined["error"]["code"] == "quarantined"
        assert quarantined["job_id"] == job_key.removeprefix("job:")
        assert "stopped 2 times in a row" in quarantined["error"]["message"]
        kept = share / f".edgevl-poison-{quarantined['job_id']}.jpg"
        assert f"the file is kept as {kept}" in quarantined["error"]["message"]
        assert kept.stat().st_size == 1 << 30
        assert by_rule["cam"]["schema"] == "edgevl.result/2", "the daemon keeps answering"
        assert "quarantined" in d.log()
    finally:
        assert d.stop() == 0
    d.start()
    try:
        d.wait_notify("READY=1")
        d.quiet(2.5)
        assert len(d.records()) == 2, "a restart never meets it again"
        assert d.in_hand() == {}
    finally:
        assert d.stop() == 0
