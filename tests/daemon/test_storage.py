"""Storage going wrong under a running daemon: a full disk, an unusable results folder, a foreign filesystem."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.daemon import DaemonProcess
from tests.harness.disks import fill
from tests.harness.images import encode, noise_image

pytestmark = pytest.mark.slow


def _jpeg(seed: int) -> bytes:
    return encode(noise_image(160, 120, seed=seed), "JPEG")


def test_full_disk_keeps_the_job_and_delivers_once_space_returns(tmp_path: Path, test_model_dir: Path,
                                                                  small_tmpfs: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    d.move("results", small_tmpfs / "results")
    filler = small_tmpfs / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    d.start()
    try:
        d.wait_notify("READY=1")
        (d.inbox / "a.jpg").write_bytes(_jpeg(1))
        d.wait_log("No space left on device")
        assert "stays in the spool" in d.log()
        assert d.proc is not None
        assert d.proc.poll() is None
        assert len(list((d.state / "spool").iterdir())) == 1
        filler.unlink()  # space comes back
        records = d.wait_records(1, timeout=90)
    finally:
        assert d.stop() == 0
    assert len(records) == 1
    assert [p.name for p in (d.results / "cam").iterdir()] == ["a.json"]
    assert not list((d.state / "spool").iterdir())


def test_unusable_results_folder_is_retried_until_it_works(tmp_path: Path, test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    d.results.write_text("a file where the results folder should be")
    d.start()
    try:
        d.wait_notify("READY=1")
        (d.inbox / "a.jpg").write_bytes(_jpeg(1))
        (d.inbox / "b.jpg").write_bytes(_jpeg(2))
        d.wait_log("cannot deliver job")
        d.results.unlink()
        d.results.mkdir()
        records = d.wait_records(2, timeout=90)
    finally:
        assert d.stop() == 0
    assert sorted(p.name for p in (d.results / "cam").iterdir()) == ["a.json", "b.json"]
    assert {r["schema"] for r in records} == {"edgevl.result/2"}


def test_inbox_on_another_filesystem_is_claimed_atomically(tmp_path: Path, test_model_dir: Path,
                                                           small_tmpfs: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    inbox = small_tmpfs / "inbox"
    inbox.mkdir()
    d.rules_path.write_text(d.rules_path.read_text().replace(str(d.inbox), str(inbox)))
    (inbox / "share.jpg").write_bytes(_jpeg(3))
    d.start()
    try:
        records = d.wait_records(1)
    finally:
        assert d.stop() == 0
    assert records[0]["source"]["path"] == str(inbox / "share.jpg")
    assert not list(inbox.glob("*.jpg"))
    assert not list((inbox / ".edgevl-claim").iterdir())


def test_a_full_state_directory_leaves_files_in_their_inbox(tmp_path: Path, test_model_dir: Path,
                                                            small_tmpfs: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    d.move("state", small_tmpfs / "state")
    d.start()
    try:
        d.wait_notify("READY=1")
        filler = fill(small_tmpfs)
        with filler.open("r+b") as f:
            f.truncate(filler.stat().st_size - (64 << 10))  # room for a job's description, not its image
        image = d.inbox / "frame.jpg"
        image.write_bytes(encode(noise_image(640, 480, seed=7), "JPEG"))
        assert image.stat().st_size > 128 << 10, "more than the room left"
        d.wait_log("cannot take")
        assert "No space left on device; it stays in its folder" in d.log()
        assert image.exists(), "back under its own name"
        assert not list((d.inbox / ".edgevl-claim").iterdir())
        filler.unlink()
        records = d.wait_records(1)
        assert records[0]["schema"] == "edgevl.result/2"
    finally:
        assert d.stop() == 0
