"""Crash-safe file operations: atomic writes, no-overwrite placement, durable renames."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(folder: Path, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path.parent, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def json_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, indent=2) + "\n").encode()


def candidate_names(stem: str, suffix: str) -> Callable[[int], str]:
    """``stem.suffix``, then ``stem.1.suffix``, ``stem.2.suffix`` … for names cameras reuse."""
    return lambda n: f"{stem}{suffix}" if n == 0 else f"{stem}.{n}{suffix}"


def place_new(folder: Path, names: Callable[[int], str], data: bytes,
              is_ours: Callable[[Path], bool]) -> Path:
    """Write ``data`` under the first free name in ``folder``, never overwriting a file.

    A file that ``is_ours`` recognises (written by this same job before a crash)
    is returned instead of writing a second copy, so a replayed job delivers once.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(folder, data)
    try:
        for n in range(100_000):
            target = folder / names(n)
            if target.exists() and is_ours(target):
                return target
            try:
                os.link(tmp, target)  # fails if the name exists: no overwrite, no race
            except FileExistsError:
                continue
            fsync_dir(folder)
            return target
        raise OSError(f"no free name left in {folder}")
    finally:
        tmp.unlink(missing_ok=True)


def move_new(src: Path, folder: Path, names: Callable[[int], str]) -> Path:
    """Move ``src`` into ``folder`` under the first free name (no overwrite)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(100_000):
        target = folder / names(n)
        try:
            os.link(src, target)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # on another filesystem: copy instead
                raise
            data = src.read_bytes()
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(folder)
        src.unlink()
        fsync_dir(src.parent)
        return target
    raise OSError(f"no free name left in {folder}")
