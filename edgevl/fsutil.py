"""Crash-safe file operations: atomic writes, no-overwrite placement, durable renames, and reads of
files from outside that can neither block nor exhaust memory."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgevl.errors import InputError

_CHUNK = 1 << 20


def kind_of(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words for a log line or an error record."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def open_regular(path: Path, follow_symlinks: bool = False) -> tuple[int, os.stat_result]:
    """An fd and the status of ``path``, only if it is a regular file; ``InputError`` otherwise.

    O_NONBLOCK: opening a FIFO (or a link to one) would otherwise wait for a writer forever;
    O_NOFOLLOW: a symbolic link is refused unless asked for. The check is made on the open fd,
    so nothing can be swapped in between.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path.name} is a symbolic link", "not_a_regular_file") from None
        if exc.errno == errno.ENXIO:  # a socket
            raise InputError(f"{path.name} is a socket, not a regular file", "not_a_regular_file") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{path.name} is a {kind_of(st.st_mode)}, not a regular file", "not_a_regular_file")
    return fd, st


def read_regular(path: Path, max_bytes: int, follow_symlinks: bool = False) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them (``InputError`` beyond)."""
    fd, st = open_regular(path, follow_symlinks)
    try:
        if st.st_size > max_bytes:
            raise InputError(f"{path.name} has {st.st_size} bytes, over the limit of {max_bytes}", "file_too_large")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(_CHUNK, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:  # it grew after the check
            raise InputError(f"{path.name} grew over the limit of {max_bytes} bytes", "file_too_large")
        return b"".join(chunks)
    finally:
        os.close(fd)


def copy_regular(src: Path, dst: Path) -> None:
    """Copy a regular file to a new ``dst`` (fsynced), holes kept as holes.

    Streams in chunks, never the whole file in memory, and reads only the data
    extents: a sparse file of 50 GB with nothing in it copies at once.
    """
    fd, st = open_regular(src)
    try:
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            pos = 0
            while pos < st.st_size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # only a hole is left
                        break
                    raise
                end = os.lseek(fd, start, os.SEEK_HOLE)
                while start < end:
                    chunk = memoryview(os.pread(fd, min(_CHUNK, end - start), start))
                    if not chunk:
                        break
                    while chunk:  # a full disk writes short first, then fails
                        written = os.pwrite(out, chunk, start)
                        chunk = chunk[written:]
                        start += written
                pos = end
            os.ftruncate(out, st.st_size)
            os.fsync(out)
        except BaseException:
            os.close(out)
            dst.unlink(missing_ok=True)
            raise
        os.close(out)
    finally:
        os.close(fd)


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
    # backslashreplace: a lone surrogate (a file name's undecodable byte that slipped
    # through) becomes a JSON escape instead of an exception.
    return (json.dumps(record, ensure_ascii=False, indent=2) + "\n").encode("utf-8", "backslashreplace")


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


def reserve_new(folder: Path, names: Callable[[int], str]) -> Path:
    """Create an empty file under the first free name in ``folder``: the name is the caller's from now on,
    even with another daemon writing to the same folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(100_000):
        target = folder / names(n)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue
        os.close(fd)
        fsync_dir(folder)
        return target
    raise OSError(f"no free name left in {folder}")


def move_onto(src: Path, target: Path) -> None:
    """Move ``src`` onto ``target``, a name reserved for it, replacing it in one step; across
    filesystems by a copy beside the target first. Safe to repeat after a crash."""
    try:
        os.replace(src, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        part = target.with_name(f".{target.name}.part")
        part.unlink(missing_ok=True)
        copy_regular(src, part)
        os.replace(part, target)
        fsync_dir(target.parent)
        src.unlink()
    fsync_dir(target.parent)
    fsync_dir(src.parent)
