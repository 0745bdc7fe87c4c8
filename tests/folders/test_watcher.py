"""The folder watcher with the real watchdog observer (inotify and polling)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgevl.folders.watcher import FolderWatcher
from edgevl.rules import Rule


def _rule(folder: Path, recursive: bool = False) -> Rule:
    return Rule.model_validate({"name": "cam", "folders": [folder], "patterns": ["*.jpg", "*.PNG"],
                                "recursive": recursive, "question": [{"id": "q", "ask": "?"}]})


def _wait_ready(w: FolderWatcher, count: int, timeout: float = 10) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [p for p, _ in w.ready()]
        if len(ready) >= count:
            return ready
        w.wake.wait(0.05)
        w.wake.clear()
    raise AssertionError(f"only {[p for p, _ in w.ready()]} ready after {timeout} s")


def _until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.05)


@pytest.mark.parametrize("poll", [0.0, 0.2])
def test_slow_writes_renames_and_ignored_names(tmp_path: Path, poll: float) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "before.jpg").write_bytes(b"x" * 10)
    with FolderWatcher((_rule(inbox),), settle_ms=400, poll_interval=poll, rescan_interval=60) as w:
        assert _wait_ready(w, 1) == [inbox / "before.jpg"]
        w.forget(inbox / "before.jpg")
        (inbox / "before.jpg").unlink()
        with (inbox / "slow.jpg").open("wb") as f:
            for _ in range(4):
                f.write(b"y" * 1000)
                f.flush()
                time.sleep(0.1)
                assert inbox / "slow.jpg" not in [p for p, _ in w.ready()]  # still being written
        (inbox / "upper.PNG").write_bytes(b"z")
        (inbox / "incoming.tmp").write_bytes(b"m")
        os.rename(inbox / "incoming.tmp", inbox / "moved.jpg")
        for name in (".hidden.jpg", "a.part", "b.tmp", "~$c.jpg", "d.crdownload", "e.txt"):
            (inbox / name).write_bytes(b"i")
        ready = _wait_ready(w, 3)
        assert sorted(p.name for p in ready) == ["moved.jpg", "slow.jpg", "upper.PNG"]


def test_a_file_renamed_in_from_outside_the_watched_tree_is_taken_at_once(tmp_path: Path) -> None:
    # A station writes into its own temporary folder on the share and renames the finished frame into the
    # watched one: complete on arrival, so it waits for no settling.
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    with FolderWatcher((_rule(inbox),), settle_ms=60_000, poll_interval=0, rescan_interval=60) as w:
        (staging / "frame.jpg").write_bytes(b"x" * 100)
        os.rename(staging / "frame.jpg", inbox / "frame.jpg")
        assert _wait_ready(w, 1, timeout=5) == [inbox / "frame.jpg"]
        (inbox / "written.jpg").write_bytes(b"y")  # one written in place still settles
        _until(lambda: w.waiting() == 2)
        os.rename(inbox / "frame.jpg", staging / "frame.jpg")  # and one renamed out is gone
        _until(lambda: not w.ready() and w.waiting() == 1)


def test_rescan_catches_files_the_events_missed_and_recursive_rules(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "sub" / ".private").mkdir(parents=True)
    w = FolderWatcher((_rule(inbox, recursive=True),), settle_ms=0, poll_interval=0, rescan_interval=0.2)
    with w:
        (inbox / "sub" / "deep.jpg").write_bytes(b"x")
        (inbox / "sub" / ".private" / "no.jpg").write_bytes(b"x")
        w._candidates.clear()  # as if the event had been lost
        assert w.ready() == []
        deadline = time.monotonic() + 5
        while not w.ready() and time.monotonic() < deadline:  # the next rescan finds it
            w.wake.wait(0.05)
            w.tick()
        assert [p for p, _ in w.ready()] == [inbox / "sub" / "deep.jpg"]


def test_watcher_stops_promptly(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    w = FolderWatcher((_rule(inbox),), settle_ms=0, poll_interval=0, rescan_interval=60)
    w.start()
    stopper = threading.Thread(target=w.stop)
    stopper.start()
    stopper.join(5)
    assert not stopper.is_alive(), "the watcher did not stop"


def test_missing_folder_is_picked_up_when_it_appears(tmp_path: Path) -> None:
    inbox = tmp_path / "later"
    with FolderWatcher((_rule(inbox),), settle_ms=0, poll_interval=0, rescan_interval=60) as w:
        inbox.mkdir()
        w.rescan()
        (inbox / "a.jpg").write_bytes(b"x")
        assert _wait_ready(w, 1) == [inbox / "a.jpg"]
