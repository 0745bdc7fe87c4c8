"""The int4 kernel (edgevl/engine/int4.c through edgevl.engine.int4_kernel): the same bits as exact integer
arithmetic on every instruction set this CPU has, rows independent of each other, damaged activations, the
four-bit groups on the int8 grid, and the kernel's build."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevl.engine import int4_kernel
from edgevl.engine.int4_kernel import GROUP, Int4Linear, Int4Rows, dequantized_grid, quantize_groups
from edgevl.engine.kernels import quantize_rows
from edgevl.errors import ModelError
from tests.harness.disks import fill
from tests.harness.int4 import levels


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return int4_kernel.library(tmp_path_factory.mktemp("kernels"))


def groups_of(out_features: int, in_features: int, seed: int = 0) -> Int4Rows:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize_groups(*quantize_rows(weight))


def exact(rows: Int4Rows, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, spelled out: each row of ``x`` quantized symmetric in int8 (the float32 step, the
    product with its inverse rounded half to even), the whole sum of its products with the grid's int8 values
    in 64 bits, then as float32 times the step, times the row's scale."""
    step = (x.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    xq = torch.round(x * (1.0 / step).unsqueeze(1)).clamp(-127, 127).to(torch.int64)
    totals = xq @ dequantized_grid(rows).to(torch.int64).t()
    return totals.float() * step.unsqueeze(1) * rows.scales.unsqueeze(0)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 8, 9])
def test_every_instruction_set_gives_the_bits_of_exact_integer_sums(lib: ctypes.CDLL, count: int) -> None:
    rows = groups_of(48, 384)
    x = torch.randn(count, 384, generator=torch.Generator().manual_seed(count))
    want = exact(rows, x)
    for limit in levels(lib):
        assert torch.equal(Int4Linear(rows, None, lib, limit)(x), want), limit


def test_the_largest_partial_sums_are_exact(lib: ctypes.CDLL) -> None:
    """The AVX2 path sums eight byte-pair products in 16 bits before it widens them; at the extremes (levels at 15,
    the highest q + 8, activations all at +127 or all at -127) that is 30,480 a lane, still exact."""
    weight = torch.full((16, 2 * GROUP), 0.875)
    weight[:, ::GROUP] = -1.0  # each group's largest value negative: step 16, the others at level 7 (q + 8 = 15)
    weight[8:] *= -1.0  # the largest positive: step -16, the others at level 7 as well
    rows = quantize_groups(*quantize_rows(weight))
    grid = dequantized_grid(rows)
    assert (int(grid[0, 1]), int(grid[0, 0]), int(grid[8, 1]), int(grid[8, 0])) == (112, -128, -112, 112)
    for sign in (1.0, -1.0):
        x = torch.full((3, 2 * GROUP), sign)
        x[2, ::2] = -sign  # alternating signs: a pair's products cancel
        want = exact(rows, x)
        for limit in levels(lib):
            assert torch.equal(Int4Linear(rows, None, lib, limit)(x), want), (sign, limit)


def test_groups_on_the_int8_grid_hold_each_value_within_a_step() -> None:
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(3))
    weight[0, :128] *= 0.02  # a group of small values: exact on the grid
    weight[1, 200] = -weight[1].abs().max() * 1.5  # the row's largest value negative: a group of step 16
    weight[2, 10] = weight[2].abs().max() * 1.5  # positive: a group of step -16
    q, s = quantize_rows(weight)
    rows = quantize_groups(q, s)
    grid = dequantized_grid(rows).view(16, 2, GROUP)
    values = q.to(torch.int32).view(16, 2, GROUP)
    steps = rows.steps.view(2, 16).t().to(torch.int32).unsqueeze(2)  # the block's steps: group by group
    assert torch.equal(rows.scales, s.float())
    assert torch.all(steps.abs() <= 16)
    assert torch.all(steps != 0)
    assert torch.equal(grid[0, 0], values[0, 0]), "values within -7..7 are kept exactly"
    assert int(steps[0, 0]) in (1, -1)
    # Each group's step is the least that holds its value of largest magnitude within -8 steps, on that side.
    largest = values.gather(2, values.abs().argmax(dim=2, keepdim=True))
    assert torch.all(largest.abs() <= 8 * steps.abs())
    assert torch.all(largest.abs() > 8 * (steps.abs() - 1))
    assert torch.all(largest * steps <= 0)
    assert int(steps[1, 1]) == 16
    assert int(steps[2, 0]) == -16
    assert int(grid[2, 0, 10]) == 112
    # Every value within half a step of its level, but those held at the ends (beyond +7 steps, or below -7 where
    # the step is -16: -8 steps would be +128, off the grid), within one.
    assert torch.all((grid >= -128) & (grid <= 127))
    error = (grid - values).abs()
    raw = values / steps
    beyond = (raw > 7.5) | ((steps == -16) & (raw < -7.5))
    assert torch.all(error[~beyond] * 2 <= steps.abs().expand_as(error)[~beyond])
    assert torch.all(error[beyond] <= steps.abs().expand_as(error)[beyond])


def test_a_row_is_the_same_alone_and_among_others(lib: ctypes.CDLL) -> None:
    """Activations are quantized per row: the stream mode's frames do not change each other's decode steps."""
    rows = groups_of(32, 256, seed=1)
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(5))
    for limit in levels(lib):
        layer = Int4Linear(rows, None, lib, limit)
        together = layer(x)
        for row in range(7):
            assert torch.equal(layer(x[row: row + 1]), together[row: row + 1])


@settings(max_examples=40, deadline=None)
@given(count=st.integers(1, 6), groups=st.integers(1, 3), tiles=st.integers(1, 5), seed=st.integers(0, 2**16),
       damage=st.sampled_from([None, float("nan"), float("inf"), float("-inf"), 0.0, 1e30]))
def test_any_shape_and_activations_end_in_finite_outputs(tmp_path_factory: pytest.TempPathFactory, count: int,
                                                         groups: int, tiles: int, seed: int,
                                                         damage: float | None) -> None:
    lib = int4_kernel.library(tmp_path_factory.getbasetemp() / "kernels-any")
    rows = groups_of(tiles * int4_kernel.LANES, groups * GROUP, seed)
    x = torch.randn(count, groups * GROUP, generator=torch.Generator().manual_seed(seed))
    if damage is not None:
        x[0, seed % x.shape[1]] = damage
    outputs = [Int4Linear(rows, None, lib, limit)(x) for limit in levels(lib)]
    for out in outputs:
        assert torch.equal(out, outputs[0]), "the same bits on every instruction set, a damaged row's too"
        assert out.shape == (count, tiles * int4_kernel.LANES)
        # The rows without damage are exact integer sums, whatever a damaged row beside them holds.
        clean = slice(1, count) if damage is not None else slice(0, count)
        assert torch.equal(out[clean], exact(rows, x[clean]))
        # A NaN or an infinity in a row is held to the int8 range there (a NaN as zero): never a NaN out.
        assert torch.isfinite(out).all()


def test_bias_and_leading_dimensions(lib: ctypes.CDLL) -> None:
    rows = groups_of(16, 128)
    bias = torch.arange(16, dtype=torch.float32)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(2))
    out = Int4Linear(rows, bias, lib)(x)
    assert out.shape == (2, 3, 16)
    assert torch.equal(out, Int4Linear(rows, None, lib)(x) + bias)


def test_shapes_without_whole_groups_are_refused(lib: ctypes.CDLL) -> None:
    assert not int4_kernel.fits(16, 64)
    assert not int4_kernel.fits(8, 128)
    assert int4_kernel.fits(16, 128)
    assert not int4_kernel.fits(16, 65536 + 128), "its 32-bit sums could overflow"
    with pytest.raises(ValueError, match="whole int4 groups"):
        quantize_groups(*quantize_rows(torch.randn(16, 64)))
    rows = groups_of(16, 128)
    with pytest.raises(ValueError, match="other shapes"):
        Int4Linear(rows._replace(scales=rows.scales[:8]), None, lib)


def test_the_build_is_kept_and_reused(tmp_path: Path) -> None:
    first = int4_kernel.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert int4_kernel.build(tmp_path) == first
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial build left behind


def test_a_failing_compiler_is_a_model_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.raises(ModelError, match="building the int4 kernel failed"):
        int4_kernel.build(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_built_kernel_that_does_not_load_is_built_again(tmp_path: Path) -> None:
    built = int4_kernel.build(tmp_path)
    built.write_bytes(b"not a shared library")  # damaged on disk
    lib = int4_kernel.library(tmp_path)
    assert int4_kernel.level(lib) in int4_kernel.LEVELS
    assert built.read_bytes()[:4] == b"\x7fELF"


def test_a_kernels_folder_that_cannot_be_made_is_a_model_error(tmp_path: Path) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state directory should be")
    with pytest.raises(ModelError, match="cannot build the int4 kernel in") as caught:
        int4_kernel.build(blocked / "kernels")
    assert caught.value.code == "model_unsupported"


def test_a_disk_that_fills_while_compiling_is_a_model_error_that_leaves_nothing(small_tmpfs: Path) -> None:
    kernels = small_tmpfs / "kernels"
    kernels.mkdir()
    filler = fill(small_tmpfs)
    with pytest.raises(ModelError, match="int4 kernel"):
        int4_kernel.build(kernels)
    assert list(kernels.iterdir()) == [], "no partial build left behind"
    filler.unlink()  # space again: the next start builds it
    built = int4_kernel.build(kernels)
    assert [p.name for p in kernels.iterdir()] == [built.name]
