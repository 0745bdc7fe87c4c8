"""``edgevl run`` as systemd runs it: a real process, real folders, real signals, the test model."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.harness.daemon import RULES, DaemonProcess
from tests.harness.images import encode, noise_image

pytestmark = pytest.mark.slow


def _jpeg(seed: int = 0) -> bytes:
    return encode(noise_image(160, 120, seed=seed), "JPEG")


def test_folder_to_results_under_systemd_notify(tmp_path: Path, test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    (d.inbox / "early.jpg").write_bytes(_jpeg(1))  # present before the start: caught up
    (d.inbox / "broken.png").write_bytes(encode(noise_image(200, 200), "PNG")[:300])
    d.start()
    try:
        ready = d.wait_notify("READY=1")
        assert "STATUS=" in ready
        records = d.wait_records(2)
        assert {r["source"]["path"] for r in records} == {str(d.inbox / "early.jpg"), str(d.inbox / "broken.png")}

        # A slow writer: the file is taken only once complete.
        data = _jpeg(2)
        with (d.inbox / "slow.jpg").open("wb") as f:
            for start in range(0, len(data), len(data) // 4):
                f.write(data[start : start + len(data) // 4])
                f.flush()
                time.sleep(0.15)  # shorter than settle_ms: the writer is still busy
        # Renamed into place by its writer, and names the rules ignore.
        (d.inbox / "moved.part").write_bytes(_jpeg(3))
        os.rename(d.inbox / "moved.part", d.inbox / "moved.jpg")
        for ignored in (".hidden.jpg", "upload.tmp", "x.part", "~$lock.jpg", "y.crdownload", "notes.txt"):
            (d.inbox / ignored).write_bytes(_jpeg(4))
        # A camera reusing its file name.
        (d.inbox / "snapshot.jpg").write_bytes(_jpeg(5))
        records = d.wait_records(5)
        (d.inbox / "snapshot.jpg").write_bytes(_jpeg(6))
        records = d.wait_records(6)
        d.wait_notify("WATCHDOG=1")
        d.wait_notify("done 5, failed 1")
    finally:
        code = d.stop()
    assert code == 0
    assert any("STOPPING=1" in m for m in d.messages)

    results = sorted(p.name for p in (d.results / "cam").iterdir())
    assert results == ["early.json", "moved.json", "slow.json", "snapshot.1.json", "snapshot.json"]
    assert sorted(p.name for p in (d.failed / "cam").iterdir()) == ["broken.png", "broken.png.error.json"]
    assert sorted(p.name for p in (d.archive / "cam").iterdir()) == [
        "early.jpg", "moved.jpg", "slow.jpg", "snapshot.1.jpg", "snapshot.jpg"]
    assert sorted(p.name for p in d.inbox.iterdir()) == sorted(
        [".hidden.jpg", "upload.tmp", "x.part", "~$lock.jpg", "y.crdownload", "notes.txt"])
    by_name = {Path(r["source"]["path"]).name: r for r in records}
    slow = by_name["slow.jpg"]
    assert slow["schema"] == "edgevl.result/2"
    assert slow["source"]["kind"] == "folder"
    assert slow["device_id"] == "test-station"
    assert slow["rule"] == "cam"
    assert isinstance(slow["answers"]["defect"]["value"], bool)
    assert "alarm" in slow["answers"]["defect"]
    assert slow["image"]["sha256"]
    assert slow["image"]["format"] == "JPEG"
    broken = by_name["broken.png"]
    assert broken["schema"] == "edgevl.error/1"
    assert broken["error"]["code"] == "image_unreadable"
    assert not list((d.state / "spool").iterdir())


def test_sighup_reloads_valid_rules_and_keeps_them_on_invalid(tmp_path: Path, test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir).start()
    try:
        d.wait_notify("READY=1")
        worker = d.wait_worker("ready")
        d.rules_path.write_text("[[rule]]\nname = 'cam'\nbogus = true\n")
        d.signal(signal.SIGHUP)
        d.wait_notify("RELOADING=1")
        (d.inbox / "a.jpg").write_bytes(_jpeg(1))
        first = d.wait_records(1)[0]
        assert set(first["answers"]) == {"defect", "label"}  # the old rules still apply
        assert "reload refused" in d.log()
        assert 'rule "cam": unknown key "bogus"' in d.log()

        d.messages.clear()
        extra = '  [[rule.question]]\n  id = "count"\n  ask = "How many parts?"\n  type = "number"\n'
        d.rules_path.write_text(RULES.format(inbox=d.inbox) + extra)
        d.signal(signal.SIGHUP)
        d.wait_notify("RELOADING=1")
        d.wait_notify("READY=1")
        assert d.wait_worker("ready", restarts=0) == worker, "a rules reload keeps the loaded model"
        (d.inbox / "b.jpg").write_bytes(_jpeg(2))
        records = d.wait_records(2)
        second = next(r for r in records if r["source"]["path"].endswith("b.jpg"))
        assert set(second["answers"]) == {"defect", "label", "count"}
    finally:
        assert d.stop() == 0


def test_sigterm_finishes_the_current_image_and_a_second_one_stops_at_once(tmp_path: Path,
                                                                           test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    d.start()
    d.wait_notify("READY=1")
    d.freeze_worker()  # the next image is "current" for as long as the test wants
    (d.inbox / "a.jpg").write_bytes(_jpeg(1))
    d.wait_notify(" busy,")
    (d.inbox / "b.jpg").write_bytes(_jpeg(2))
    d.signal(signal.SIGTERM)
    d.wait_notify("STOPPING=1")
    assert d.proc is not None
    assert d.proc.poll() is None, "the first SIGTERM waits for the current image"
    d.signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    d.close()
    assert not d.records()
    spooled = [p for p in (d.state / "spool").iterdir()]
    assert len(spooled) == 1  # the current job stays in the spool …
    assert [p.name for p in d.inbox.glob("*.jpg")] == ["b.jpg"]  # … and the other image was never taken

    d.start()
    records = d.wait_records(2)
    assert sorted(Path(r["source"]["path"]).name for r in records) == ["a.jpg", "b.jpg"]
    # First SIGTERM alone: the current image is finished, then the daemon exits.
    worker = d.freeze_worker()
    d.messages.clear()
    (d.inbox / "c.jpg").write_bytes(_jpeg(3))
    d.wait_notify(" busy,")
    d.signal(signal.SIGTERM)
    d.wait_notify("STOPPING=1")
    d.thaw_worker(worker)
    assert d.proc.wait(30) == 0
    d.close()
    assert len(d.records()) == 3
    assert "stopped cleanly" in d.log()


def test_kill_9_at_random_points_loses_and_doubles_nothing(tmp_path: Path, test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    names = [f"img{i:02d}.jpg" for i in range(30)]
    for i, name in enumerate(names):
        data = _jpeg(i) if i % 7 else b"not an image at all"
        (d.inbox / name).write_bytes(data)
    rng = random.Random(1234)
    interrupted: set[str] = set()
    for _ in range(6):
        d.start()
        d.wait_notify("READY=1")
        # A random instant of the work, once the restart has finished what the last kill interrupted:
        # killed twice in a row with the same image in hand, that image is quarantined by design
        # (tests/test_hostile_folders.py), not answered.
        deadline = time.monotonic() + 30
        while set(d.in_hand()) & interrupted and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.3))
        d.kill()
        interrupted = set(d.in_hand())
    d.start()
    try:
        d.wait_notify("READY=1")
        d.wait_records(len(names), timeout=120)
    finally:
        assert d.stop() == 0
    records = d.records()
    sources = Counter(Path(r["source"]["path"]).name for r in records)
    assert sources == Counter(names), "every image exactly once"
    assert len({r["job_id"] for r in records}) == len(names)
    assert not [r for r in records if r.get("error", {}).get("code") == "quarantined"]
    failed = sorted(Path(r["source"]["path"]).name for r in records if r["schema"] == "edgevl.error/1")
    assert failed == [n for i, n in enumerate(names) if i % 7 == 0]
    archived = sorted(p.name for p in (d.archive / "cam").iterdir())
    assert archived == sorted(n for i, n in enumerate(names) if i % 7)
    assert not list(d.inbox.iterdir())
    assert not list((d.state / "spool").iterdir())


def test_two_daemons_sharing_a_folder_answer_each_image_once(tmp_path: Path, test_model_dir: Path) -> None:
    a = DaemonProcess(tmp_path / "a", test_model_dir)
    b = DaemonProcess(tmp_path / "b", test_model_dir)
    shared = tmp_path / "shared-inbox"
    shared.mkdir()
    for d in (a, b):
        d.rules_path.write_text(d.rules_path.read_text().replace(str(d.inbox), str(shared)))
    names = [f"f{i:02d}.jpg" for i in range(16)]
    a.start()
    b.start()
    try:
        # Both must be able to work before the frames arrive; otherwise the first
        # model loaded may answer every frame before the second is up, which is fine
        # for the product but proves nothing about sharing.
        a.wait_notify("READY=1")
        b.wait_notify("READY=1")
        for i, name in enumerate(names):
            (shared / name).write_bytes(_jpeg(i))
        deadline = time.monotonic() + 120
        while len(a.records()) + len(b.records()) < len(names) and time.monotonic() < deadline:
            a.read_notify(0.1)
            b.read_notify(0.1)
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    sources = Counter(Path(r["source"]["path"]).name for r in a.records() + b.records())
    assert sources == Counter(names)
    assert a.records(), "both daemons took work"
    assert b.records(), "both daemons took work"


def test_the_configured_log_level_holds_for_the_daemon_and_its_worker(tmp_path: Path, test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir, config_extra='[log]\nlevel = "warning"\n')
    d.start()
    try:
        d.wait_notify("READY=1")
        (d.inbox / "a.png").write_bytes(encode(noise_image(64, 64), "PNG"))
        (d.inbox / "b.png").write_bytes(b"not an image")  # a warning: this one is logged
        d.wait_records(2)
    finally:
        assert d.stop() == 0
    log = d.log()
    assert "WARNING" in log
    assert " INFO " not in log, "neither the daemon's nor the worker's INFO lines"
