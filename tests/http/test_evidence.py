"""A record's image by its job id: served only from the archive and failed folders, never anything else."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import falcon.testing
import pytest

from edgevl.config import HttpSettings
from edgevl.http.jobs import RecentRecords
from edgevl.records import Job
from tests.harness.http import HOST, in_process_api


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[falcon.testing.TestClient, RecentRecords, Path]]:
    archive = tmp_path / "archive"
    (archive / "cam").mkdir(parents=True)
    recent = RecentRecords(10)
    with in_process_api(HttpSettings(listen=HOST), recent=recent, image_roots=lambda: [archive]) as client:
        yield client, recent, archive


def _record(recent: RecentRecords, job_id: str, image_file: str | None) -> None:
    record = Job(rule="cam", source={"kind": "folder", "path": "/in/x"}, job_id=job_id).result(
        {"sha256": "", "width": 1, "height": 1, "format": "JPEG"}, {"id": "m", "precision": "int8"}, {}, {})
    record["image_file"] = image_file
    recent.add(record)


def test_the_image_of_a_record_with_any_name(served: tuple[falcon.testing.TestClient, RecentRecords, Path]) -> None:
    client, recent, archive = served
    image = archive / "cam" / 'odd "name"\nhere.jpg'
    image.write_bytes(b"\xff\xd8\xff jpeg bytes")
    _record(recent, "j1", str(image))
    result = client.simulate_get("/v1/results/j1/image")
    assert result.status_code == 200
    assert result.content == b"\xff\xd8\xff jpeg bytes"
    assert result.headers["Content-Type"] == "image/jpeg"
    disposition = result.headers["Content-Disposition"]
    assert "\n" not in disposition
    assert unquote(disposition.split("UTF-8''", 1)[1]) == image.name
    assert client.simulate_get("/v1/results/j1").json["image_file"] == str(image)


@pytest.mark.parametrize("kind", ["outside", "link", "deleted", "gone", "unknown"])
def test_nothing_but_a_kept_image_is_served(served: tuple[falcon.testing.TestClient, RecentRecords, Path],
                                            tmp_path: Path, kind: str) -> None:
    client, recent, archive = served
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"not for the API")
    link = archive / "cam" / "link.jpg"
    os.symlink(secret, link)
    target = {"outside": str(secret), "link": str(link), "deleted": None,
              "gone": str(archive / "cam" / "retained-no-more.jpg")}.get(kind)
    if kind != "unknown":
        _record(recent, "j2", target)
    result = client.simulate_get("/v1/results/j2/image")
    assert result.status_code == 404
    assert result.json["error"]["code"] == ("not_found" if kind == "unknown" else "image_not_kept")
    assert b"not for the API" not in result.content
