"""The floor's arithmetic on the real 2B shapes (a header-only checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgevl.bench.floor import floor_seconds, linear_params
from tests.worker.test_footprint import _shapes_only_checkpoint


def test_the_2b_matrices_are_counted_once_each(tmp_path: Path) -> None:
    params = linear_params(_shapes_only_checkpoint(tmp_path / "2b"))
    # Qwen3-VL-2B: a ~0.4 B vision tower, ~1.4 B of language-model matrices, a tied 151,936 x 2,048 head.
    assert 0.3e9 < params.vision < 0.5e9
    assert 1.2e9 < params.text < 1.6e9
    assert params.head == 151_936 * 2048


def test_the_floor_is_prefill_at_the_256_row_rate_plus_each_step_reading_the_weights(tmp_path: Path) -> None:
    params = linear_params(_shapes_only_checkpoint(tmp_path / "2b"))
    rates = {"packed_m1": 10.0, "packed_m256": 200.0, "int8_m1": 80.0, "int8_m256": 700.0, "read_gbs": 30.0}
    work = {"patches": 784, "prefill_tokens": 300, "logit_rows": 8, "decode_steps": 23}
    prefill = 2 * (params.vision * 784 + params.text * 300 + params.head * 8)
    step_weights = params.text + params.head  # 1.7 G weights: 6.9 GB in float32, 1.7 GB in int8
    float32 = prefill / 200e9 + 23 * 4 * step_weights / 30e9
    assert floor_seconds(params, work, rates, "float32") == pytest.approx(float32)
    assert floor_seconds(params, work, rates, "int8") == pytest.approx(prefill / 700e9 + 23 * step_weights / 30e9)
    assert 0.05 < step_weights / 30e9 < 0.06, "the issue's int8 decode floor: ~1.7 GB at ~31 GB/s"
    # Without fbgemm, int8 prefill is judged at the fallback's rate; bfloat16 has no measured kernel.
    fallback = {"int8_int_mm_m1": 20.0, "int8_int_mm_m256": 600.0, "read_gbs": 30.0}
    assert floor_seconds(params, work, fallback, "int8") == pytest.approx(prefill / 600e9 + 23 * step_weights / 30e9)
    assert floor_seconds(params, work, rates, "bfloat16") is None
