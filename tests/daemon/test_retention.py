"""Retention on real folders and a real small filesystem: what goes, in which order, and what never does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from edgevl.config import FolderSettings, RetentionSettings
from edgevl.daemon.retention import Retention, oldest_covering
from tests.harness.disks import fill
from tests.harness.images import encode, noise_image
from tests.http.test_http import _daemon

NOW = 1_800_000_000.0
DAY = 86400.0


def _file(path: Path, size: int, age_days: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (NOW - age_days * DAY, NOW - age_days * DAY))
    return path


def _retention(root: Path, watched: list[Path] | None = None, **settings: object) -> Retention:
    folders = FolderSettings(results=root / "results", archive=root / "archive", failed=root / "failed")
    return Retention(RetentionSettings.model_validate(settings), folders, root / "state", lambda: watched or [])


def _names(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 100)), max_size=30), st.integers(0, 2000))
def test_oldest_covering_is_the_shortest_run_of_oldest_files(files: list[tuple[int, int]], amount: int) -> None:
    listing = [(float(m), s, f"f{i}") for i, (m, s) in enumerate(files)]
    chosen = oldest_covering(iter(listing), amount)
    assert chosen == sorted(chosen), "oldest first"
    rest = [f for f in listing if f not in chosen]
    assert all(f[0] >= chosen[-1][0] for f in rest) if chosen else True, "none newer than a file left"
    total = sum(s for _, s, _ in chosen)
    if sum(s for _, s, _ in listing) < amount:
        assert sorted(chosen) == sorted(listing)
    else:
        assert total >= amount
        assert not chosen or total - chosen[-1][1] < amount, "no file more than needed"


def test_age_and_size_limits_per_folder(tmp_path: Path) -> None:
    results = tmp_path / "results"
    for day in range(10):
        _file(results / "cam" / f"r{day}.json", 100, age_days=day)
    _file(results / "cam" / ".r99.json.tmp", 100, age_days=50)  # a record being written
    archive = tmp_path / "archive"
    for day in range(6):
        _file(archive / "cam" / f"a{day}.jpg", 1000, age_days=day)
    failed = tmp_path / "failed"
    _file(failed / "cam" / "old.jpg", 10, age_days=100)
    retention = _retention(tmp_path, results={"max_age_days": 4.5}, archive={"max_size": 3500})
    counts = retention.sweep(NOW)
    assert _names(results) == {"cam/.r99.json.tmp", *(f"cam/r{d}.json" for d in range(5))}
    assert _names(archive) == {"cam/a0.jpg", "cam/a1.jpg", "cam/a2.jpg"}, "the oldest go first"
    assert _names(failed) == {"cam/old.jpg"}, "no limit set: kept"
    assert (counts.folders["results"].deleted_files, counts.folders["results"].deleted_bytes) == (5, 500)
    assert (counts.folders["archive"].deleted_files, counts.folders["archive"].size_bytes) == (3, 3000)
    assert counts.folders["failed"].size_bytes == 10
    assert retention.sweep(NOW).folders["archive"].deleted_files == 3, "a second sweep has nothing to do"


def test_links_fifos_and_undecodable_names_in_a_folder(tmp_path: Path) -> None:
    results = tmp_path / "results" / "cam"
    outside = _file(tmp_path / "elsewhere" / "precious.json", 100, age_days=90)
    results.mkdir(parents=True)
    (results / "link.json").symlink_to(outside)
    os.mkfifo(results / "pipe.json")  # a sweep must not open it, nor wait on it
    odd = os.fsencode(str(results)) + b"/caf\xe9.json"  # a name that is not UTF-8
    with open(odd, "wb") as f:
        f.write(b"x" * 10)
    os.utime(odd, (NOW - 90 * DAY, NOW - 90 * DAY))
    counts = _retention(tmp_path, results={"max_age_days": 1}).sweep(NOW)
    assert not os.path.lexists(odd), "an old regular file goes, whatever its name"
    assert (results / "link.json").is_symlink(), "a link is not removed"
    assert outside.exists(), "nor followed"
    assert (results / "pipe.json").exists()
    assert counts.folders["results"].deleted_files == 1


def test_never_the_spool_the_outbox_the_ledger_or_a_watched_folder(tmp_path: Path) -> None:
    # The worst layout: every folder inside the results folder.
    state = tmp_path / "state"
    results = tmp_path
    spooled = _file(state / "spool" / "job1" / "image.jpg", 100, age_days=90)
    outbox = _file(state / "mqtt" / "outbox" / "entry.json", 100, age_days=90)
    ledger = _file(state / "in-hand.json", 10, age_days=90)
    inbox = tmp_path / "inbox"
    waiting = _file(inbox / "frame.jpg", 100, age_days=90)
    archived = _file(tmp_path / "archive" / "cam" / "frame.jpg", 100, age_days=90)
    record = _file(results / "cam" / "frame.json", 100, age_days=90)
    folders = FolderSettings(results=results, archive=tmp_path / "archive", failed=tmp_path / "failed")
    retention = Retention(RetentionSettings.model_validate({"results": {"max_age_days": 1, "max_size": 1}}),
                          folders, state, lambda: [inbox])
    retention.sweep(NOW)
    assert all(p.exists() for p in (spooled, outbox, ledger, waiting, archived))
    assert not record.exists()


def test_the_free_space_floor_on_a_real_filesystem(tmp_path: Path, small_tmpfs: Path) -> None:
    archive = small_tmpfs / "archive"
    for i in range(6):
        _file(archive / "cam" / f"a{i}.jpg", 100_000, age_days=6 - i)
    filler = fill(small_tmpfs)
    filler.write_bytes(b"\0" * 200_000)  # someone else's file: never touched
    folders = FolderSettings(results=tmp_path / "results", archive=archive, failed=tmp_path / "failed")
    retention = Retention(RetentionSettings.model_validate({"min_free": 300_000}), folders, tmp_path / "state",
                          list)
    counts = retention.sweep(NOW)
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    assert free >= 300_000
    kept = sorted(_names(archive))
    assert kept == [f"cam/a{i}.jpg" for i in range(6 - len(kept), 6)], "the oldest went first"
    assert 0 < counts.folders["archive"].deleted_files < 6
    assert counts.below_floor is False

    # Something else fills the disk: the oldest archived images make room again, as much as asked.
    (small_tmpfs / "more").mkdir()
    fill(small_tmpfs / "more")
    before = len(kept)
    counts = retention.sweep(NOW)
    assert len(_names(archive)) == before - 3, "three images of 100 kB give back the 300 kB asked"
    assert counts.below_floor is False
    # A floor the whole archive cannot meet: the archive empties, and the counts say the floor is not met.
    retention.settings = RetentionSettings.model_validate({"min_free": 900_000})
    counts = retention.sweep(NOW)
    assert _names(archive) == set()
    assert counts.below_floor is True
    assert filler.stat().st_size == 200_000


def test_the_daemon_keeps_answering_while_its_archive_disk_would_overflow(tmp_path: Path, test_model_dir: Path,
                                                                          small_tmpfs: Path) -> None:
    archive = small_tmpfs / "archive"
    d, client = _daemon(tmp_path, test_model_dir, '[retention]\nmin_free = "400KiB"\ninterval = 0.2\n')
    d.move("archive", archive)
    # 150 KB of noise per frame, 10 frames: half again what the 1 MiB disk holds.
    frames = [encode(noise_image(400, 120, seed=i), "PNG") for i in range(10)]
    assert all(len(f) > 140_000 for f in frames)
    d.start()
    try:
        d.wait_notify("READY=1")
        for i, frame in enumerate(frames):
            (d.inbox / f"f{i}.png").write_bytes(frame)
            d.wait_records(i + 1, timeout=90)
        d.wait_log("deleted the")
        status, document = client.get("/v1/status")
        assert status == 200
        swept = document["retention"]["archive"]
        assert swept["deleted_files"] >= 1
        assert document["retention"]["below_free_space_floor"] is False
        _, text = client.get("/metrics")
        samples = {(s.name, tuple(s.labels.values())): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert samples[("edgevl_retention_deleted_files_total", ("archive",))] >= swept["deleted_files"]
        assert samples[("edgevl_retention_deleted_bytes_total", ("archive",))] > 140_000
    finally:
        assert d.stop() == 0
    records = d.records()
    assert len(records) == 10
    assert {r["schema"] for r in records} == {"edgevl.result/2"}, "every frame answered, none failed"
    kept = sorted(p.name for p in (archive / "cam").iterdir())
    assert 0 < len(kept) < 10
    assert kept == [f"f{i}.png" for i in range(10 - len(kept), 10)], "the newest frames are kept"
    assert "No space left on device" not in d.log()


@pytest.mark.parametrize(("settings", "message"), [
    ({"results": {"max_age_days": -1}}, "greater than or equal to 0"),
    ({"archive": {"max_size": "lots"}}, "could not parse"),
    ({"interval": 0}, "greater than 0"),
    ({"results": {"keep": 3}}, "Extra inputs"),  # pydantic's own words: the file's loader rewords them
])
def test_bad_retention_settings_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetentionSettings.model_validate(settings)
