"""The spool's steps, each interrupted where a crash could interrupt it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgevl.spool.claim import claim
from edgevl.spool.job import SpoolJob
from edgevl.spool.store import Spool


def _record(job_id: str, schema: str = "edgevl.result/2") -> dict[str, object]:
    rec: dict[str, object] = {"schema": schema, "job_id": job_id}
    if schema != "edgevl.result/2":
        rec["error"] = {"code": "image_unreadable", "message": "x"}
    return rec


def test_claim_of_a_vanished_file_takes_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert claim(spool, tmp_path / "gone.jpg", "cam", "t", 1 << 20) is None
    assert spool.pending() == []


def test_crash_before_the_rename_leaves_the_image_in_its_inbox(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.jpg").write_bytes(b"x")
    job = claim(spool, inbox / "a.jpg", "cam", "t", 1 << 20)
    assert job is not None
    os.rename(job.image, inbox / "a.jpg")  # as if the rename had never happened
    assert spool.pending() == []
    assert (inbox / "a.jpg").exists()
    assert not job.dir.exists()


def test_finish_is_idempotent_after_a_crash_at_any_step(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    results, archive, failed = tmp_path / "results", tmp_path / "archive", tmp_path / "failed"
    (results / "cam").mkdir(parents=True)
    (results / "cam" / "a.json").write_text(json.dumps({"job_id": "someone-else"}))  # an earlier "a.jpg"
    (inbox / "a.jpg").write_bytes(b"img")
    job = claim(spool, inbox / "a.jpg", "cam", "t", 1 << 20)
    assert job is not None
    job.save_record(_record(job.job_id))
    first = spool.finish(job, results, archive, failed)
    assert first.name == "a.1.json"
    # Replay as after a crash just before the job folder was removed: no second result.
    job.dir.mkdir()
    (job.dir / "job.json").write_text(json.dumps(job.meta))
    job.save_record(_record(job.job_id))
    again = spool.pending()
    assert [j.job_id for j in again] == [job.job_id]
    assert spool.finish(again[0], results, archive, failed) == first
    assert sorted(p.name for p in (results / "cam").iterdir()) == ["a.1.json", "a.json"]
    assert [p.name for p in (archive / "cam").iterdir()] == ["a.jpg"]


def test_failed_image_lands_beside_its_error_record(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (tmp_path / "bad.png").write_bytes(b"nope")
    job = claim(spool, tmp_path / "bad.png", "cam", "t", 1 << 20)
    assert job is not None
    job.save_record(_record(job.job_id, "edgevl.error/1"))
    spool.finish(job, tmp_path / "r", None, tmp_path / "failed")
    assert sorted(p.name for p in (tmp_path / "failed" / "cam").iterdir()) == ["bad.png", "bad.png.error.json"]


def test_archive_disabled_deletes_the_image(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (tmp_path / "a.jpg").write_bytes(b"img")
    job = claim(spool, tmp_path / "a.jpg", "cam", "t", 1 << 20)
    assert job is not None
    job.save_record(_record(job.job_id))
    spool.finish(job, tmp_path / "r", None, tmp_path / "f")
    assert not (tmp_path / "a.jpg").exists()
    assert spool.count() == 0


def test_listing_the_spool_before_the_quarantine_recovers_nothing(tmp_path: Path, small_tmpfs: Path) -> None:
    # MQTT reads the spool's job ids at start, before poison inputs are quarantined: a copy
    # that stopped edgevl twice must not be started a third time by that listing.
    inbox = small_tmpfs / "inbox"  # another filesystem than the spool
    inbox.mkdir()
    (inbox / "a.jpg").write_bytes(b"\xff\xd8\xff image")
    spool = Spool(tmp_path / "spool")
    job = claim(spool, inbox / "a.jpg", "cam", "t", 1 << 20)
    assert job is not None
    held = inbox / ".edgevl-claim" / f"{job.key}.jpg"
    held.write_bytes(job.image.read_bytes())  # as if the copy had been cut short
    job.image.unlink()
    assert [j.key for j in spool.readable()] == [job.key]
    assert held.exists(), "the listing copied nothing"
    assert not job.image.exists()
    assert [j.key for j in spool.pending()] == [job.key]
    assert job.image.exists(), "pending() recovers it"
    assert not held.exists()


@pytest.mark.parametrize("text", ["{not json", "[]", '"a string"', '{"job_id": "x"}', '{"job_id": "x", "rule": "cam", '
                                  '"name": 7, "received_at": "t", "source": {}}', '{"job_id": "x", "rule": "cam", '
                                  '"name": "a.jpg", "received_at": "t", "source": 3}'])
def test_any_damage_to_a_job_description_is_one_kind_of_error(tmp_path: Path, text: str) -> None:
    # Callers (the worker-loss policy among them) handle ValueError; a KeyError from a half-written
    # job.json must not pass them by and end the daemon.
    spool = Spool(tmp_path / "spool")
    (spool.root / "0000000000000001deadbeef").mkdir()
    (spool.root / "0000000000000001deadbeef" / "job.json").write_text(text)
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies with the damage
        spool.load("0000000000000001deadbeef")


def _claimed(spool: Spool, tmp_path: Path, name: str, data: bytes = b"img") -> SpoolJob:
    (tmp_path / name).write_bytes(data)
    job = claim(spool, tmp_path / name, "cam", "t", 1 << 20)
    assert job is not None
    return job


def test_the_record_says_where_the_image_is_kept(tmp_path: Path, small_tmpfs: Path) -> None:
    spool = Spool(tmp_path / "spool")
    results, failed = tmp_path / "results", tmp_path / "failed"
    archive = small_tmpfs / "archive"  # another filesystem: the image is copied there
    (archive / "cam").mkdir(parents=True)
    (archive / "cam" / "a.jpg").write_bytes(b"an earlier a.jpg")
    job = _claimed(spool, tmp_path, "a.jpg")
    job.save_record(_record(job.job_id))
    # Decided before delivery (what MQTT publishes), and the same when the job is finished.
    decided = spool.place_image(job, False, archive, failed)
    assert decided == str(archive / "cam" / "a.1.jpg")
    assert spool.place_image(job, False, archive, failed) == decided
    delivered = spool.finish(job, results, archive, failed)
    assert json.loads(delivered.read_text())["image_file"] == decided
    assert Path(decided).read_bytes() == b"img"
    assert (archive / "cam" / "a.jpg").read_bytes() == b"an earlier a.jpg"

    bad = _claimed(spool, tmp_path, "bad.png")
    bad.save_record(_record(bad.job_id, "edgevl.error/1"))
    record = json.loads(spool.finish(bad, results, archive, failed).read_text())
    assert record["image_file"] == str(failed / "cam" / "bad.png")

    gone = _claimed(spool, tmp_path, "c.jpg")
    gone.save_record(_record(gone.job_id))
    assert json.loads(spool.finish(gone, results, None, failed).read_text())["image_file"] is None


def test_a_crash_between_placing_and_moving_the_image_keeps_the_place(tmp_path: Path, small_tmpfs: Path) -> None:
    spool = Spool(tmp_path / "spool")
    archive = small_tmpfs / "archive"
    job = _claimed(spool, tmp_path, "a.jpg", b"x" * 5000)
    job.save_record(_record(job.job_id))
    decided = Path(spool.place_image(job, False, archive, tmp_path / "failed") or "")
    assert decided.exists(), "the name is reserved"
    # A copy to the other filesystem torn by the crash.
    (decided.parent / f".{decided.name}.part").write_bytes(b"x" * 10)
    again = Spool(tmp_path / "spool").pending()
    delivered = spool.finish(again[0], tmp_path / "results", archive, tmp_path / "failed")
    assert json.loads(delivered.read_text())["image_file"] == str(decided)
    assert decided.read_bytes() == b"x" * 5000
    assert sorted(p.name for p in decided.parent.iterdir()) == ["a.jpg"], "no torn copy, no second name"
