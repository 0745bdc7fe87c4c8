from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Qwen3-VL built by scripts/make-test-model (built here when absent)."""
    configured = os.environ.get("EDGEVL_TEST_MODEL")
    if configured and (Path(configured) / "config.json").is_file():
        return Path(configured)
    from edgevl.checkpoints import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("test-model"))


@pytest.fixture(scope="session")
def fp32_model(test_model_dir: Path):  # type: ignore[no-untyped-def]
    from edgevl.engine.loading import load_model

    return load_model(str(test_model_dir), "float32")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (root and mount(8) needed, as on the appliance's CI)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
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
