from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.harness.broker import Broker
from tests.harness.disks import tmpfs

# Fixtures shared by name across the test packages.
pytest_plugins = ["tests.harness.browser"]

# CI runs the property-based tests on a fixed set of examples (reproducible); a developer's run
# explores new ones (HYPOTHESIS_PROFILE=explore makes it explore twenty times as many).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))



@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Qwen3-VL built by scripts/make-test-model (built here when absent)."""
    configured = os.environ.get("EDGEVL_TEST_MODEL")
    if configured and (Path(configured) / "config.json").is_file():
        return Path(configured)
    from edgevl.bench.checkpoints import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("test-model"))


@pytest.fixture(scope="session")
def grouped_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen3-VL whose language model's matrices have whole int4 groups (128 inputs), unlike
    the test model's (64): the int4 precision's layers exist in it."""
    from edgevl.bench.checkpoints import build_checkpoint
    from tests.harness.int4 import GROUPED

    return build_checkpoint(tmp_path_factory.mktemp("grouped-model"), GROUPED)


@pytest.fixture(scope="session")
def fp32_model(test_model_dir: Path):  # type: ignore[no-untyped-def]
    from edgevl.engine.loading import load_model

    return load_model(str(test_model_dir), "float32")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (root and mount(8) needed, as on the appliance's CI)."""
    yield from tmpfs(tmp_path / "small", "1m")


@pytest.fixture
def big_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem other than the test's folder, room for a 1 GiB file."""
    yield from tmpfs(tmp_path / "big", "1200m")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto of the test's own, on a free loopback port, for tests that break or restart it."""
    b = Broker(tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()
