"""Real filesystems for the tests: small ones to fill, others to cross (root and mount(8) needed, as on CI)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(filesystem: Path) -> Path:
    """Fill ``filesystem`` to the last page with one file; deleting it gives the space back."""
    filler = filesystem / "filler"
    with filler.open("wb", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            try:
                while f.write(b"\0" * chunk):
                    pass
            except OSError:
                pass
    return filler
