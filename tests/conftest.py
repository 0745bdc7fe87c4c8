from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the property-based tests on a fixed set of examples (reproducible); a developer's run
# explores new ones (HYPOTHESIS_PROFILE=explore makes it explore ten times as many).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

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


def _tmpfs(mount: Path, size: str) -> Iterator[Path]:
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (root and mount(8) needed, as on the appliance's CI)."""
    yield from _tmpfs(tmp_path / "small", "1m")


@pytest.fixture
def big_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem other than the test's folder, room for a 1 GiB file."""
    yield from _tmpfs(tmp_path / "big", "1200m")


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
