"""A record's image by its job id: served only from the archive and failed folders, never anything else."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from urllib.parse import unquote

import falcon.testing
import pytest

from edgevl.config import HttpSettings
from edgevl.http.api import Backend, make_app
from edgevl.http.jobs import HttpQueue, RecentRecords
from edgevl.http.metrics import Metrics
from edgevl.records import Job

HOST = "127.0.0.1:8080"


@pytest.fixture
def served(tmp_path: Path) -> tuple[falcon.testing.TestClient, RecentRecords, Path]:
    archive = tmp_path / "archive"
    (archive / "cam").mkdir(parents=True)
    recent = RecentRecords(10)
    health = {"pid": 1, "state": "ready", "restarts": 0, "rss": 1, "memory_limit": 2, "up_since": 0.0, "job": None,
              "job_seconds": 0.0}
    backend = Backend("dev", lambda: (), HttpQueue(1, threading.Event()), recent, lambda: (True, {}), lambda: {},
                      Metrics("m", "float32", lambda: health, lambda: 0), 200_704, lambda: [archive])
    client = falcon.testing.TestClient(make_app(backend, HttpSettings(listen=HOST), None), headers={"Host": HOST})
    return client, recent, archive


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
