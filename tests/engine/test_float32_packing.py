"""float32's kernel chosen by a trial at load: oneDNN-packed weights only where they multiply faster here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from edgevl import cpuinfo
from edgevl.engine import float32_packing, loading
from edgevl.engine.float32_packing import PAYS_AT, STREAM_ROWS, TRIAL_ROWS, PackedLinear, Trial
from edgevl.engine.loading import load_model

pytestmark = pytest.mark.skipif(not float32_packing.packing_available(), reason="this torch has no oneDNN packing")


@pytest.fixture(autouse=True)
def fresh_decision() -> Iterator[None]:
    float32_packing.decide.cache_clear()  # a decision is kept for the process: each test makes its own
    yield
    float32_packing.decide.cache_clear()


def _trial(*ratios: float, transposed: float = 0.01) -> Trial:
    return Trial((6144, 2048), 2, tuple(0.01 * r for r in ratios), tuple(0.01 for _ in ratios), transposed)


def test_packing_pays_by_the_geometric_mean_over_decode_stream_and_prefill() -> None:
    # Times measured on 2-core hosts: an AVX2 EPYC (1.12x at one row, 2.02x at eight, 1.07x at 256), an Intel
    # Xeon (as fast at one row, 1.2x at 256), an AVX2 EPYC where F.linear was faster at both.
    assert _trial(1.12, 2.02, 1.07).speedup == pytest.approx((1.12 * 2.02 * 1.07) ** (1 / 3))
    assert _trial(1.12, 2.02, 1.07).pays
    assert _trial(1.0, 1.2, 1.2).pays
    assert not _trial(0.9, 1.1, 0.95).pays
    assert not _trial(1.0, 1.0, 1.0).pays  # equal is not worth a reorder at every start
    assert _trial(PAYS_AT, PAYS_AT, PAYS_AT).pays
    assert "1 row 11.20 against 10.00 ms" in _trial(1.12, 2.02, 1.07).describe()


def test_the_head_multiplies_transposed_where_that_is_faster_at_the_stream_modes_rows() -> None:
    # Compared with F.linear at eight rows (the trial's second row count), as the head multiplies a stream's rows.
    assert TRIAL_ROWS[1] == STREAM_ROWS
    assert _trial(1.0, 1.8, 1.0, transposed=0.01).transposed_pays  # 18 against 10 ms
    assert not _trial(1.0, 1.05, 1.0, transposed=0.01).transposed_pays
    assert not _trial(5.0, 1.0, 5.0, transposed=0.01).transposed_pays  # only the stream's rows count
    assert "8 rows transposed 10.00 ms" in _trial(1.0, 1.0, 1.0).describe()


@pytest.mark.parametrize(("cache_mb", "available", "expected"), [
    (32, 84, 2),  # an EPYC's 32 MB: two 50 MB matrices are already twice the cache
    (300, 84, 8),  # a Xeon's 300 MB: as many as the trial times at most
    (None, 84, 2),  # the kernel does not say: 32 MB
    (32, 1, 1),  # never more than the model has
    (1, 84, 2),  # at least two, so that one is never timed straight after itself
])
def test_the_trial_times_matrices_beyond_the_cache(cache_mb: int | None, available: int, expected: int) -> None:
    cache = None if cache_mb is None else cache_mb << 20
    assert float32_packing.trial_matrices((6144, 2048), available, cache) == expected


def test_a_trial_times_both_kernels_at_every_row_count() -> None:
    found = float32_packing.trial((256, 128), 2)
    assert found.shape == (256, 128)
    assert found.matrices == 2
    assert len(found.dense) == len(found.packed) == len(TRIAL_ROWS)
    assert all(0 < t < 5 for t in (*found.dense, *found.packed, found.transposed))
    assert found.pays is (found.speedup >= PAYS_AT)


def test_a_model_that_fits_in_the_cache_is_not_tried_and_stays_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_trial(shape: tuple[int, int], matrices: int) -> Trial:
        raise AssertionError("timed a model that fits in the cache")

    monkeypatch.setattr(float32_packing, "trial", no_trial)
    monkeypatch.setattr(cpuinfo, "last_level_cache_bytes", lambda: 32 << 20)
    assert float32_packing.decide((256, 128), 6) is None  # 0.8 MB


def test_without_onednn_packing_nothing_is_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(float32_packing, "packing_available", lambda: False)
    monkeypatch.setattr(cpuinfo, "last_level_cache_bytes", lambda: 1)
    assert float32_packing.decide((6144, 2048), 84) is None


def test_a_trial_that_fails_leaves_the_load_on_f_linear(test_model_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(shape: tuple[int, int], matrices: int) -> Trial:
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(float32_packing, "trial", fails)
    monkeypatch.setattr(cpuinfo, "last_level_cache_bytes", lambda: 1024)
    lm = load_model(str(test_model_dir), "float32")
    assert not any(isinstance(m, PackedLinear) for m in lm.model.modules())
    assert float32_packing.trial_for(lm.config) is None


@pytest.mark.parametrize("faster", [True, False])
def test_a_load_follows_its_trial(test_model_dir: Path, monkeypatch: pytest.MonkeyPatch, faster: bool) -> None:
    # With a cache smaller than the test model, the load times both kernels on its MLP's shape and takes the
    # faster; the trial's clock is set here so that each outcome is seen on any CPU.
    config = json.loads((test_model_dir / "config.json").read_text())["text_config"]
    shape = (config["intermediate_size"], config["hidden_size"])
    seen: list[tuple[int, int]] = []
    real = float32_packing.trial

    def timed(trial_shape: tuple[int, int], matrices: int) -> Trial:
        seen.append(trial_shape)
        measured = real(trial_shape, matrices)  # the real kernels, on the model's shape
        ratio = 2.0 if faster else 0.5
        dense = tuple(p * ratio for p in measured.packed)
        return Trial(measured.shape, measured.matrices, dense, measured.packed, dense[1] / ratio)

    monkeypatch.setattr(float32_packing, "trial", timed)
    monkeypatch.setattr(cpuinfo, "last_level_cache_bytes", lambda: 1024)
    converting: list[int] = []
    convert = loading.convert_linear

    def counted(*args: object) -> None:
        converting.append(torch.get_num_threads())
        convert(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(loading, "convert_linear", counted)
    lm = load_model(str(test_model_dir), "float32", threads=2)
    assert seen == [shape]
    # The layers are loaded one per core, each converted on one thread; the answers get their threads back.
    assert converting
    assert set(converting) == {1}
    assert torch.get_num_threads() == lm.threads == 2
    gate = lm.model.model.language_model.layers[0].mlp.gate_proj
    assert type(gate) is (PackedLinear if faster else nn.Linear)
    assert lm.model.lm_head.transposed is faster
    with safe_open(str(test_model_dir / "model.safetensors"), framework="pt") as f:
        weight = f.get_tensor("model.language_model.layers.0.mlp.gate_proj.weight").float()
    assert torch.equal(gate.packed.to_dense() if faster else gate.weight, weight)  # the file's weights either way
    x = torch.randn(3, gate.in_features)
    assert torch.allclose(gate(x), F.linear(x, weight), atol=1e-5)


def test_the_test_model_stays_on_f_linear_on_any_cpu(test_model_dir: Path) -> None:
    # Its weights fit in any last-level cache: no trial, and the same kernels at every start, so that answers
    # compared across processes come from the same products.
    lm = load_model(str(test_model_dir), "float32")
    assert not any(isinstance(m, PackedLinear) for m in lm.model.modules())
    assert not lm.model.lm_head.transposed
    assert float32_packing.trial_for(lm.config) is None
