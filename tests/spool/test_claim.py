"""Taking folder entries into the spool, in process: entries of any kind and name, sizes beyond the limit.

Property-based (hypothesis) over real files, FIFOs, sockets, links and folders,
plus the cases one can name.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevl.errors import InputError
from edgevl.folders.watcher import FolderWatcher
from edgevl.fsutil import read_regular
from edgevl.rules import Rule
from edgevl.spool.claim import claim
from edgevl.spool.store import Spool

MAX = 4096  # max_bytes in these tests
NAME_BYTES = st.binary(min_size=1, max_size=255).filter(lambda b: b"/" not in b and b"\0" not in b
                                                       and b not in (b".", b".."))
KINDS = ("regular", "large", "fifo", "socket", "dir", "link_file", "link_dev", "link_fifo", "link_none", "link_loop")


def _make(path: Path, kind: str, content: bytes = b"\x89PNG\r\n\x1a\n data") -> None:
    """A real entry of ``kind`` at ``path``."""
    if kind == "regular":
        path.write_bytes(content)
    elif kind == "large":
        with path.open("wb") as f:
            f.truncate(50 << 30)  # sparse: 50 GB that take no room
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(os.fsencode(path))
    elif kind == "dir":
        path.mkdir()
    elif kind == "link_file":
        target = path.parent.parent / "targets" / "t.png"
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(content)
        os.symlink(os.path.relpath(target, path.parent), path)
    elif kind == "link_dev":
        os.symlink("/dev/zero", path)
    elif kind == "link_fifo":
        fifo = path.parent.parent / "targets" / "f"
        fifo.parent.mkdir(exist_ok=True)
        if not fifo.exists():
            os.mkfifo(fifo)
        os.symlink(fifo, path)
    elif kind == "link_none":
        os.symlink("/nonexistent/x.png", path)
    elif kind == "link_loop":
        os.symlink(os.fsencode(path), path)


def _rule(folder: Path, follow: bool) -> Rule:
    return Rule.model_validate({"name": "cam", "folders": [folder], "patterns": ["*"], "max_bytes": MAX,
                                "follow_symlinks": follow, "question": [{"id": "q", "ask": "?"}]})


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(NAME_BYTES, st.sampled_from(KINDS), st.binary(max_size=64)), min_size=1,
                        max_size=6, unique_by=lambda e: e[0].lower()), follow=st.booleans())
def test_any_entry_is_taken_whole_or_left_alone(tmp_path_factory: pytest.TempPathFactory,
                                                entries: list[tuple[bytes, str, bytes]], follow: bool) -> None:
    root = tmp_path_factory.mktemp("boundary")
    inbox = root / "inbox"
    inbox.mkdir()
    spool = Spool(root / "spool")
    watcher = FolderWatcher((_rule(inbox, follow),), settle_ms=0, poll_interval=0, rescan_interval=60)
    made: dict[Path, str] = {}
    for raw, kind, content in entries:
        path = inbox / os.fsdecode(raw)
        if path.name.startswith(".") or path.name.lower().endswith((".tmp", ".part", ".crdownload", ".partial",
                                                                      ".swp")) or path.name.startswith("~$"):
            continue  # names the watcher ignores by design
        _make(path, kind, b"\xff\xd8\xff" + content)
        made[path] = kind
    for path in made:
        watcher.note(path)
    takeable = {"regular", "large"} | ({"link_file"} if follow else set())
    ready = {p for p, _ in watcher.ready()}
    assert ready == {p for p, kind in made.items() if kind in takeable}

    for path, kind in made.items():
        if kind not in takeable:
            with pytest.raises(InputError) as refused:
                claim(spool, path, "cam", "t", MAX, follow_symlinks=follow, device_id="dev")
            assert refused.value.code == "not_a_regular_file"
            assert os.path.lexists(path), "a refused entry stays where it is"
            continue
        job = claim(spool, path, "cam", "t", MAX, follow_symlinks=follow, device_id="dev")
        assert job is not None
        assert not os.path.lexists(path)
        meta = json.loads((job.dir / "job.json").read_bytes())
        assert meta["source"]["path"].encode("utf-8")
        image_mode = os.lstat(job.image).st_mode
        assert stat.S_ISREG(image_mode), "the spool holds regular files only"
        record = job.record()
        if kind == "large":
            assert record is not None
            assert record["error"]["code"] == "file_too_large"
            assert os.stat(job.image).st_blocks == 0, "never read, never filled"
        else:
            assert record is None
            assert read_regular(job.image, MAX).startswith(b"\xff\xd8\xff")
            job.save_record({"schema": "edgevl.result/2", "job_id": job.job_id})
        delivered = spool.finish(job, root / "results", root / "archive", root / "failed")
        assert len(delivered.name.encode()) <= 255
        assert json.loads(delivered.read_bytes())["job_id"] == job.job_id
    assert spool.pending() == []
    for folder in ("archive", "failed"):
        for entry in (root / folder).rglob("*"):
            assert not entry.is_symlink(), "outputs never hold links"


def test_a_full_spool_on_another_filesystem_puts_the_file_back(tmp_path: Path, small_tmpfs: Path) -> None:
    from tests.harness.disks import fill

    inbox = tmp_path / "inbox"  # on the disk; the spool is on a tiny tmpfs: another filesystem
    inbox.mkdir()
    image = inbox / "big.jpg"
    image.write_bytes(b"\xff\xd8\xff" + os.urandom(300_000))
    spool = Spool(small_tmpfs / "spool")
    filler = fill(small_tmpfs)
    with filler.open("r+b") as f:
        f.truncate(filler.stat().st_size - (64 << 10))  # room for job.json, not for the image
    with pytest.raises(OSError, match="No space left"):
        claim(spool, image, "cam", "t", 1 << 20)
    assert image.exists(), "the file is back under its own name"
    assert not list((inbox / ".edgevl-claim").iterdir())
    assert spool.pending() == []
    filler.unlink()
    job = claim(spool, image, "cam", "t", 1 << 20)
    assert job is not None
    assert job.image.read_bytes()[:3] == b"\xff\xd8\xff"
    assert not image.exists()


def test_a_damaged_spool_job_is_failed_not_lost(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    broken = spool.root / "0000000000000001deadbeef"
    broken.mkdir()
    (broken / "job.json").write_text("{not json")
    (broken / "image.jpg").write_bytes(b"\xff\xd8\xff")
    legacy = spool.root / "0000000000000002deadbeef"  # a FIFO spooled by an older edgevl
    legacy.mkdir()
    (legacy / "job.json").write_text(json.dumps({"job_id": legacy.name, "rule": "cam", "name": "pipe.png",
                                                 "received_at": "t", "source": {"kind": "folder", "path": "/x"}}))
    os.mkfifo(legacy / "image.png")
    (job_a, job_b) = spool.pending("dev")
    record = job_a.record()
    assert record is not None
    assert record["error"]["code"] == "spool_damaged"
    spool.finish(job_a, tmp_path / "r", None, tmp_path / "failed")
    assert sorted(p.name for p in (tmp_path / "failed" / "_unknown").iterdir()) == [
        f"{broken.name}.jpg", f"{broken.name}.jpg.error.json"]
    with pytest.raises(InputError, match="FIFO"):
        read_regular(job_b.image, MAX)
