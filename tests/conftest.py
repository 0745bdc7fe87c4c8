from __future__ import annotations

import os
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
