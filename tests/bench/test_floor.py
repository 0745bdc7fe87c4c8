"""The floor's arithmetic on the real 2B shapes (a header-only checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgevl.bench.floor import (
    attention_flops,
    decode_read,
    floor_seconds,
    linear_params,
    text_attention_flops,
    vision_attention_flops,
)
from tests.worker.test_footprint import _shapes_only_checkpoint

W4 = {"patches": 784, "prefill_tokens": 300, "prefix_tokens": 200, "logit_rows": 8, "decode_steps": 23}


def test_the_2b_matrices_are_counted_once_each(tmp_path: Path) -> None:
    params = linear_params(_shapes_only_checkpoint(tmp_path / "2b"))
    # Qwen3-VL-2B: a ~0.4 B vision tower, ~1.4 B of language-model matrices, a tied 151,936 x 2,048 head.
    assert 0.3e9 < params.vision < 0.5e9
    assert 1.2e9 < params.text < 1.6e9
    assert params.head == 151_936 * 2048
    assert (params.vision_attention, params.text_attention) == (24 * 1024, 28 * 16 * 128)


def test_the_floor_is_products_at_their_rates_and_each_step_reading_the_weights(tmp_path: Path) -> None:
    params = linear_params(_shapes_only_checkpoint(tmp_path / "2b"))
    rates = {"packed_m1": 10.0, "packed_m256": 200.0, "int8_m1": 80.0, "int8_m256": 700.0, "read_gbs": 30.0,
             "attention_gflops": 150.0}
    products = 2 * (params.vision * 784 + params.text * 300 + params.head * 8)
    attention = attention_flops(params, W4) / 150e9
    step_weights = params.text + params.head  # 1.7 G weights: 6.9 GB in float32, 1.7 GB in int8
    float32 = products / 200e9 + attention + 23 * 4 * step_weights / 30e9
    assert floor_seconds(params, W4, rates, "float32") == pytest.approx(float32)
    int8 = products / 700e9 + attention + 23 * step_weights / 30e9
    assert floor_seconds(params, W4, rates, "int8") == pytest.approx(int8)
    assert 0.05 < step_weights / 30e9 < 0.06, "the int8 decode floor: ~1.7 GB at ~31 GB/s"
    # Without fbgemm, int8 prefill is judged at the fallback's rate; bfloat16 has no measured kernel.
    fallback = {"int8_int_mm_m1": 20.0, "int8_int_mm_m256": 600.0, "read_gbs": 30.0, "attention_gflops": 150.0}
    expected = products / 600e9 + attention + 23 * step_weights / 30e9
    assert floor_seconds(params, W4, fallback, "int8") == pytest.approx(expected)
    # Where F.linear outruns the packed kernel at 256 rows (as on one Intel host), the floor takes its rate.
    faster_stock = {**rates, "float32_m256": 250.0}
    assert floor_seconds(params, W4, faster_stock, "float32") == pytest.approx(
        products / 250e9 + attention + 23 * 4 * step_weights / 30e9)
    assert floor_seconds(params, W4, rates, "bfloat16") is None
    # Where a kernel is faster at 1,024 rows than at 256, the floor takes that: it is never above what the host
    # does.  One-row kernel rates are not memory reads (a large cache may hold the timed matrices).
    faster = {**rates, "float32_m1": 16.0, "float32_m256": 180.0, "float32_m1024": 260.0}
    assert floor_seconds(params, W4, faster, "float32") == pytest.approx(
        products / 260e9 + attention + 23 * 4 * step_weights / 30e9)
    # The engine's own decode steps read faster still (a host busier while the rates were measured): their
    # read sets the floor's steps, which are then never slower than the measured ones.
    results = [{"precision": "float32", "decode_seconds_per_token": 4 * step_weights / 34e9},
               {"precision": "int8", "decode_seconds_per_token": step_weights / 20e9}]
    assert decode_read(params, results) == pytest.approx(34.0, abs=0.05)
    steps = {**faster, "decode_read_gbs": decode_read(params, results)}
    assert floor_seconds(params, W4, steps, "float32") == pytest.approx(
        products / 260e9 + attention + 23 * 4 * step_weights / (decode_read(params, results) * 1e9))
    # oneDNN's int8 product (the vision tower's on AMX hosts), where faster at 256 rows, sets the int8 prefill.
    onednn = {**rates, "int8_onednn_m256": 1400.0}
    assert floor_seconds(params, W4, onednn, "int8") == pytest.approx(
        products / 1400e9 + attention + 23 * step_weights / 30e9)


def test_attention_is_every_patch_with_every_patch_and_the_prompt_causally(tmp_path: Path) -> None:
    params = linear_params(_shapes_only_checkpoint(tmp_path / "2b"))
    page = {"patches": 4096, "prefill_tokens": 1010, "prefix_tokens": 1000, "logit_rows": 1, "decode_steps": 0}
    vision = 4 * 24 * 1024 * 4096**2  # 1.65 TFLOP: a page's vision tower spends more on attention than on weights
    text = 4 * 28 * 16 * 128 * (1000**2 / 2 + 10 * 1000)
    assert attention_flops(params, page) == pytest.approx(vision + text)


def test_an_int8_vision_tower_that_attends_in_bfloat16_is_floored_at_that_rate(tmp_path: Path) -> None:
    params = linear_params(_shapes_only_checkpoint(tmp_path / "2b"))
    rates = {"packed_m1": 10.0, "packed_m256": 200.0, "int8_m1": 80.0, "int8_m256": 700.0, "read_gbs": 30.0,
             "attention_gflops": 150.0}
    bf16 = {**rates, "attention_bf16_gflops": 450.0}
    vision, text = vision_attention_flops(params, W4), text_attention_flops(params, W4)
    assert vision > 0
    assert text > 0
    # int8 saves the vision part's difference; the language model's attention and float32 stay at float32's rate.
    saved = vision / 150e9 - vision / 450e9
    assert floor_seconds(params, W4, bf16, "int8") == pytest.approx(floor_seconds(params, W4, rates, "int8") - saved)
    assert floor_seconds(params, W4, bf16, "float32") == pytest.approx(floor_seconds(params, W4, rates, "float32"))
