"""Reading and copying files from outside: never blocking, never beyond the limit, holes kept."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from edgevl.errors import InputError
from edgevl.fsutil import copy_regular, read_regular
from tests.spool.test_claim import KINDS, MAX, _make


@pytest.fixture
def place(tmp_path: Path) -> Path:
    return tmp_path


def test_reading_never_blocks_and_never_reads_beyond_the_limit(place: Path) -> None:
    for kind in KINDS:
        _make(place / kind, kind)
    results: dict[str, str] = {}

    def read_all() -> None:
        for kind in KINDS:
            for follow in (False, True):
                try:
                    data = read_regular(place / kind, MAX, follow_symlinks=follow)
                    results[f"{kind}/{follow}"] = f"read {len(data)}"
                except InputError as exc:
                    results[f"{kind}/{follow}"] = exc.code
                except OSError as exc:
                    results[f"{kind}/{follow}"] = f"os {exc.errno}"

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "reading blocked (a FIFO opened for reading waits for a writer)"
    assert results["regular/False"] == "read 13"
    assert results["link_file/True"] == "read 13"
    assert results["large/False"] == "file_too_large"
    for kind in ("fifo", "socket", "dir", "link_file", "link_dev", "link_fifo"):
        assert results[f"{kind}/False"] == "not_a_regular_file", kind
    for kind in ("fifo", "socket", "dir", "link_dev", "link_fifo"):
        assert results[f"{kind}/True"] == "not_a_regular_file", kind


def test_copies_keep_holes_and_stream(place: Path) -> None:
    sparse = place / "sparse.png"
    with sparse.open("wb") as f:
        f.write(b"head")
        f.seek(10 << 30)
        f.write(b"tail")
    copy_regular(sparse, place / "copy.png")
    st_copy = os.stat(place / "copy.png")
    assert st_copy.st_size == (10 << 30) + 4
    assert st_copy.st_blocks * 512 < 1 << 20, "the holes stayed holes"
    with (place / "copy.png").open("rb") as f:
        assert f.read(4) == b"head"
        f.seek(10 << 30)
        assert f.read() == b"tail"
