"""The vision tower's int8 layers on oneDNN where the CPU has AMX: the kernel, its activations' levels, and where
the loader and the packer put it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from edgevl.engine import loading, onednn_int8
from edgevl.engine.engine import Engine
from edgevl.engine.kernels import IntMatmulLinear, int8_dot_products, int8_linear, quantize_rows
from edgevl.engine.loading import load_model
from edgevl.engine.onednn_int8 import OnednnInt8Linear, quantize_activations
from edgevl.questions import Question
from tests.harness.images import noise_image

pytestmark = pytest.mark.skipif(not onednn_int8.available(), reason="this torch has no oneDNN int8 Linear")

QUESTIONS = (Question(id="d", ask="Is there a defect?", type="yes_no"),
             Question(id="c", ask="Which class?", type="choice", options=("A", "B", "C")))


def _error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got - exact).norm() / exact.norm())


@pytest.mark.skipif(not int8_dot_products(), reason="this CPU's int8 instructions saturate in oneDNN's kernel")
@pytest.mark.parametrize("shape", [(700, 256), (2, 33, 256), (1, 256)])
def test_the_kernel_is_the_float_product_within_int8_rounding_and_no_further_than_fbgemm(
        shape: tuple[int, ...]) -> None:
    torch.manual_seed(5)
    linear = torch.nn.Linear(256, 96)
    kernel = OnednnInt8Linear(*quantize_rows(linear.weight.detach()), linear.bias.detach())
    x = torch.randn(*shape) + 0.3  # not centred on zero: the zero point is used
    with torch.inference_mode():
        exact, got, fbgemm = linear(x), kernel(x), int8_linear(linear)(x)
    assert got.shape == exact.shape
    assert got.dtype == torch.float32
    assert 0 < _error(got, exact) < 0.02
    assert _error(got, exact) <= 1.05 * _error(fbgemm, exact)  # fbgemm reduces its activations' range


@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=64))
def test_each_activation_is_within_half_a_level_and_zero_is_exact(values: list[float]) -> None:
    x = torch.tensor([*values, 0.0])
    q, scale, zero_point = quantize_activations(x)
    assert q.dtype == torch.uint8
    assert 0 <= zero_point <= 255
    back = (q.double() - zero_point) * scale
    assert float((back - x.double()).abs().max()) <= scale * (0.5 + 1e-4) + 1e-9
    assert int(q[-1]) == zero_point


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_nan_or_infinite_activation_does_not_raise(bad: float) -> None:
    linear = torch.nn.Linear(64, 8)
    kernel = OnednnInt8Linear(*quantize_rows(linear.weight.detach()), None)
    x = torch.randn(4, 64)
    x[1, 3] = bad
    with torch.inference_mode():
        assert kernel(x).shape == (4, 8)


@pytest.mark.parametrize("amx", [True, False])
def test_the_vision_tower_alone_runs_on_onednn_where_the_cpu_has_amx(amx: bool, test_model_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onednn_int8, "pays", lambda: amx)
    lm = load_model(str(test_model_dir), "int8", 1)
    onednn = {name for name, m in lm.model.named_modules() if isinstance(m, OnednnInt8Linear)}
    vision = {name for name, m in lm.model.named_modules()
              if name.startswith("model.visual.") and hasattr(m, "out_features")}
    assert len(vision) > 4
    assert onednn == (vision if amx else set())
    answered = Engine(lm).answer(noise_image(96, 80, seed=4), QUESTIONS, 96 * 96)
    assert answered.answers["c"]["value"] in ("A", "B", "C")


def test_a_later_start_packs_its_vision_tower_for_onednn_behind_the_answers(
        tmp_path: Path, test_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onednn_int8, "pays", lambda: True)
    monkeypatch.setattr(loading, "int_mm_fast", lambda: True)  # the deferring start, on any host
    first = load_model(str(test_model_dir), "int8", 1, tmp_path)
    reference = Engine(first).answer(noise_image(96, 80, seed=4), QUESTIONS, 96 * 96)
    gate = threading.Event()
    lm = load_model(str(test_model_dir), "int8", 1, tmp_path, pack_gate=gate)
    assert lm.packer is not None
    assert isinstance(lm.model.model.visual.blocks[0].mlp.linear_fc1, IntMatmulLinear)
    gate.set()
    assert lm.packer.wait(60)
    assert lm.packer.failed is None
    assert isinstance(lm.model.model.visual.blocks[0].mlp.linear_fc1, OnednnInt8Linear)
    assert not any(isinstance(m, OnednnInt8Linear) for m in lm.model.model.language_model.modules())
    answered = Engine(lm).answer(noise_image(96, 80, seed=4), QUESTIONS, 96 * 96)
    assert (answered.tokens, answered.scores) == (reference.tokens, reference.scores)
