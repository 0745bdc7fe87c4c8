"""Delivery in process, with a real spool and folders: retries with backoff, published once, a job that
breaks delivery set aside with an error record instead of stopping the loop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgevl.config import FolderSettings
from edgevl.daemon.delivery import Delivery
from edgevl.records import Record
from edgevl.spool.claim import claim
from edgevl.spool.hand import Hand
from edgevl.spool.job import SpoolJob
from edgevl.spool.store import Spool


class Publisher:
    def __init__(self, fail: Exception | None = None) -> None:
        self.published: list[str] = []
        self.records: list[Record] = []
        self.fail = fail

    def deliver(self, job: SpoolJob, record: Record, alarm_jpeg: bytes | None = None) -> None:
        if self.fail is not None:
            raise self.fail
        self.published.append(record["job_id"])
        self.records.append(record)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Spool, Delivery, list[Record], Path]:
    hand = Hand(tmp_path / "in-hand.json")
    spool = Spool(tmp_path / "spool", hand)
    done: list[Record] = []
    folders = FolderSettings(results=tmp_path / "results", archive=tmp_path / "archive", failed=tmp_path / "failed")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return spool, Delivery(spool, folders, "dev", hand, done.append), done, inbox


def _job(spool: Spool, inbox: Path, name: str) -> SpoolJob:
    (inbox / name).write_bytes(b"\xff\xd8\xff image")
    job = claim(spool, inbox / name, "cam", "t", 1 << 20)
    assert job is not None
    return job


def test_a_record_is_delivered_once_and_published_once_across_retries(
        setup: tuple[Spool, Delivery, list[Record], Path], tmp_path: Path) -> None:
    spool, delivery, done, inbox = setup
    publisher = Publisher()
    delivery.publisher = publisher
    job = _job(spool, inbox, "a.jpg")
    (tmp_path / "results").write_text("a file where the results folder should be")
    result = job.job("dev").result({"sha256": "", "width": 1, "height": 1, "format": "JPEG"},
                                   {"id": "m", "precision": "float32"}, {}, {})
    delivery.deliver(job.key, result)
    assert not delivery.due(job.key, time.monotonic()), "retried later, with backoff"
    assert delivery.due(job.key, time.monotonic() + 2.5)
    for _ in range(3):
        delivery.deliver(job.key, None)
    assert spool.count() == 1
    assert done == []
    (tmp_path / "results").unlink()
    delivery.deliver(job.key, None)
    assert publisher.published == [job.job_id], "once, however often the folder delivery was tried"
    assert [r["job_id"] for r in done] == [job.job_id]
    written = json.loads((tmp_path / "results" / "cam" / "a.json").read_text())
    assert written["job_id"] == job.job_id
    assert (tmp_path / "archive" / "cam" / "a.jpg").read_bytes() == b"\xff\xd8\xff image"
    # Published before the image moved, and still naming where it went.
    assert publisher.records[0]["image_file"] == written["image_file"] == str(tmp_path / "archive" / "cam" / "a.jpg")
    assert spool.count() == 0


def test_a_job_that_breaks_delivery_is_set_aside_with_an_error_record(
        setup: tuple[Spool, Delivery, list[Record], Path], tmp_path: Path) -> None:
    spool, delivery, done, inbox = setup
    delivery.publisher = Publisher(fail=RecursionError("maximum recursion depth exceeded"))
    job = _job(spool, inbox, "b.jpg")
    delivery.deliver(job.key, job.job("dev").error("image_unreadable", "x"))
    (record,) = done
    assert record["schema"] == "edgevl.error/1"
    assert record["error"]["code"] == "internal_error"
    assert "RecursionError" in record["error"]["message"]
    assert sorted(p.name for p in (tmp_path / "failed" / "cam").iterdir()) == [
        f"{job.key}.jpg", f"{job.key}.jpg.error.json"], "named from its key; the name first reserved is freed"
    assert record["image_file"] == str(tmp_path / "failed" / "cam" / f"{job.key}.jpg")
    assert spool.count() == 0
    assert json.loads((tmp_path / "in-hand.json").read_text())["held"] == {}
