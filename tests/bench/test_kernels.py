"""The bench's kernel measurements: the int4 kernel it times computes the product it stands for, and the
rates it reports turn into the bytes each kernel reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from edgevl.bench.kernels import (
    IN,
    OUT,
    ROWS,
    TorchInt4Linear,
    _seconds_per_busy_call,
    fault_in_rate,
    int4_rows,
    int4_verdict,
    kernel_rates,
    matrix_shape,
    packing_rate,
    read_rate,
    weight_bytes,
)
from edgevl.engine.kernels import fbgemm_int8_available, int_mm_fast


def test_torchs_int4_kernel_computes_the_product_of_the_weights_rounded_to_four_bits() -> None:
    torch.manual_seed(0)
    weight = torch.randn(192, 256) * 0.05
    group = 64
    # The same rounding spelled out: each group of 64 inputs to 16 levels between its least and greatest.
    grouped = weight.reshape(192, 256 // group, group)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    step = (high - low) / 15
    rounded = (((grouped - low) / step).round() * step + low).reshape(192, 256)
    assert (rounded - weight).abs().max() <= step.max() / 2 + 1e-6
    x = torch.randn(5, 256)
    got = TorchInt4Linear(weight, group)(x).float()
    expected = x.to(torch.bfloat16).float() @ rounded.T
    # bfloat16 activations and scales: within bfloat16's rounding of the exact product.
    assert torch.allclose(got, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())
    assert not torch.allclose(got, x @ weight.T, rtol=1e-3, atol=1e-4), "four bits are not the float weights"
    packed, scales_zeros = int4_rows(weight, group)
    assert packed.numel() * packed.element_size() == 192 * 256 // 2, "two weights a byte"
    assert scales_zeros.shape == (256 // group, 192, 2)


def test_a_one_row_rate_is_turned_into_the_bytes_the_kernel_reads() -> None:
    # 2 * 2048 * 6144 flops at 100 GFLOP/s: 0.25 ms; int8 reads 12.6 MB in it, int4 half that and its groups'.
    rates = {"int8_m1": 100.0, "int4_m1": 100.0}
    seconds = 2 * IN * OUT / 100e9
    assert read_rate(rates, "int8") == round((IN * OUT + OUT * 4) / seconds / 1e9, 1)
    assert weight_bytes("int4") == IN * OUT / 2 + (IN // 128) * OUT + OUT * 4
    assert weight_bytes("int4_torch") == IN * OUT / 2 + (IN // 128) * OUT * 4
    assert read_rate(rates, "int4") == round((IN * OUT / 2 + (IN // 128) * OUT + OUT * 4) / seconds / 1e9, 1)
    assert read_rate(rates, "int4") < read_rate(rates, "int8") / 1.8, "half the bytes, and its groups' scales"


def test_rates_are_measured_on_the_projection_given_and_read_with_its_bytes() -> None:
    rates = kernel_rates(1, 128, 64)  # the smallest shape with whole int4 groups: seconds, not minutes
    assert matrix_shape(rates) == (128, 64)
    for name in ("float32", "packed", "int8_int_mm", "int4", "int4_torch"):
        assert all(rates[f"{name}_m{rows}"] > 0 for rows in ROWS), name
    assert all(rates[key] > 0 for key in ("read_gbs", "attention_gflops", "fault_in_gbs"))
    # The one-row read counts this matrix's bytes, not the 2B shape's.
    seconds = 2 * 128 * 64 / (rates["int8_int_mm_m1"] * 1e9)
    assert read_rate(rates, "int8_int_mm") == round((128 * 64 + 64 * 4) / seconds / 1e9, 1)
    assert weight_bytes("int4", 128, 64) == 128 * 64 / 2 + 64 + 64 * 4
    # A checkpoint whose projections have no whole groups of 128 inputs has no int4 rates, and the verdict says why.
    narrow = {key: value for key, value in rates.items() if not key.startswith("int4")} | {"matrix_inputs": 64,
                                                                                          "matrix_outputs": 128}
    assert int4_verdict(narrow) == [
        "The engine's int4 kernel was not measured here (a 64x128 matrix has no whole groups of 128).",
        "Torch's int4 kernel was not measured here (a 64x128 matrix has no whole groups of 128)."]


def _kernel(seconds: float, calls: list[int]) -> Any:
    def call(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        time.sleep(seconds)  # stands for a product that takes this long
        return x
    return call


def test_a_kernel_slower_than_a_round_is_timed_by_its_first_call_alone() -> None:
    calls: list[int] = []
    seconds = _seconds_per_busy_call([_kernel(0.06, calls)] * 4, torch.zeros(1), least=0.01, most=0.05)
    assert len(calls) == 1
    assert seconds >= 0.06


def test_a_round_stops_at_its_limit_and_a_fast_kernel_is_timed_in_rounds_of_many_calls() -> None:
    calls: list[int] = []
    seconds = _seconds_per_busy_call([_kernel(0.01, calls)] * 4, torch.zeros(1), least=0.001, rounds=3, most=0.035)
    # A warm-up call, then three rounds that stop at 0.035 s, short of their eight calls.
    assert 1 + 3 <= len(calls) <= 1 + 3 * 5
    assert 0.01 <= seconds < 0.035
    calls.clear()
    _seconds_per_busy_call([_kernel(0.001, calls)] * 4, torch.zeros(1), least=0.001, rounds=3, most=1.0)
    assert len(calls) >= 1 + 3 * 8, "a fast kernel: at least two calls of each matrix a round"


@pytest.mark.slow
@pytest.mark.skipif(not fbgemm_int8_available(), reason="packing behind the answers is for fbgemm's int8 Linear")
def test_the_bench_times_a_later_int8_start_to_ready_first_answer_and_full_speed(tmp_path: Path,
                                                                                test_model_dir: Path) -> None:
    checkpoint = tmp_path / "model"
    shutil.copytree(test_model_dir, checkpoint)

    def start() -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "edgevl.bench.child", str(checkpoint), "int8", "1", "ready"],
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
        return result

    first, later = start(), start()
    assert first["prepared"] == "written"
    assert first["full_speed_seconds"] == first["ready_seconds"]
    assert later["prepared"] == "read"
    assert later["packing_failed"] is None
    ready, answered, full = (later[k] for k in ("ready_seconds", "first_answer_seconds", "full_speed_seconds"))
    assert 0 < ready <= answered
    assert later["packed_behind"] == int_mm_fast()
    if later["packed_behind"]:
        assert answered <= full, "full speed once the packing behind the first answer is done"
    else:
        assert full == ready, "packed as it was mapped: at full speed when ready"
    assert later["ready_peak_rss_bytes"] > 50e6
    # Where the start's seconds went: the imports came before ready, and loading faulted in fresh memory.
    assert 0 < later["ready_import_seconds"] <= ready
    # The kernel's CPU time for all the process's threads: within its cores' time since it started.
    assert 0 <= later["ready_system_cpu_seconds"] <= ready * (os.cpu_count() or 1)
    assert later["ready_faulted_bytes"] > 10e6


def test_a_starts_rates_are_measured_and_give_the_threads_back() -> None:
    torch.set_num_threads(2)
    seen: list[int] = []
    fault_in = fault_in_rate()
    seen.append(torch.get_num_threads())
    assert 0.01 < fault_in < 1000  # GB/s: a 256 MiB allocation written once in well under a minute
    if fbgemm_int8_available():
        packing = packing_rate()
        seen.append(torch.get_num_threads())
        assert 0.1 < packing < 1e6  # MB/s of one 12.6 MB matrix
    assert set(seen) == {2}
