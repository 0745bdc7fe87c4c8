"""The int8 layers on oneDNN where the CPU has AMX (the vision tower's; the language model's prefill copy): the
kernel, its activations' levels, and where the loader and the packer put it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from edgevl.engine import loading, onednn_int8
from edgevl.engine.engine import Answered, Engine
from edgevl.engine.kernels import IntMatmulLinear, int8_dot_products, int8_kernel, int8_linear, quantize_rows
from edgevl.engine.loading import load_model
from edgevl.engine.onednn_int8 import ByRows, OnednnInt8Linear, quantize_activations
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
    lm = load_model(str(test_model_dir), "int8", 1, prefill_copy=False)
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
    first = load_model(str(test_model_dir), "int8", 1, tmp_path, prefill_copy=False)
    reference = Engine(first).answer(noise_image(96, 80, seed=4), QUESTIONS, 96 * 96)
    gate = threading.Event()
    lm = load_model(str(test_model_dir), "int8", 1, tmp_path, pack_gate=gate, prefill_copy=False)
    assert lm.packer is not None
    assert isinstance(lm.model.model.visual.blocks[0].mlp.linear_fc1, IntMatmulLinear)
    gate.set()
    assert lm.packer.wait(60)
    assert lm.packer.failed is None
    assert isinstance(lm.model.model.visual.blocks[0].mlp.linear_fc1, OnednnInt8Linear)
    assert not any(isinstance(m, OnednnInt8Linear) for m in lm.model.model.language_model.modules())
    answered = Engine(lm).answer(noise_image(96, 80, seed=4), QUESTIONS, 96 * 96)
    assert (answered.tokens, answered.scores) == (reference.tokens, reference.scores)


@pytest.mark.parametrize("shape", [(1, 256), (1, 1, 256), (8, 256), (31, 256), (32, 256), (2, 40, 256), (300, 256)])
def test_a_layer_with_a_prefill_copy_multiplies_few_rows_with_fbgemm_and_many_with_onednn(
        shape: tuple[int, ...]) -> None:
    torch.manual_seed(6)
    linear = torch.nn.Linear(256, 96, bias=False)
    q, scales = quantize_rows(linear.weight.detach())
    few, many = int8_kernel(q, scales, None), OnednnInt8Linear(q, scales, None)
    layer = ByRows(few, many)
    x = torch.randn(*shape)
    rows = x.numel() // 256
    with torch.inference_mode():
        got = layer(x)
        assert torch.equal(got, (many if rows >= onednn_int8.PREFILL_ROWS else few)(x))
    assert got.shape == (*shape[:-1], 96)


@pytest.mark.parametrize("copy", [True, False])
def test_the_language_model_keeps_a_prefill_copy_where_allowed_and_amx_is_there(
        copy: bool, test_model_dir: Path, fp32_model, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(onednn_int8, "pays", lambda: True)
    # Eight images: the drift of one image's four scores is as much chance as kernel (on one host oneDNN came out
    # 2.5x fbgemm's on one image and 0.6x over eight).
    images = [noise_image(96, 80, seed=seed) for seed in range(1, 9)]
    fp32 = Engine(fp32_model)
    exact = [fp32.answer(image, QUESTIONS, 96 * 96) for image in images]
    int8 = Engine(load_model(str(test_model_dir), "int8", 1, prefill_copy=False))
    reference = [int8.answer(image, QUESTIONS, 96 * 96) for image in images]
    monkeypatch.setattr(onednn_int8, "PREFILL_ROWS", 2)  # the test model's prompts are short: every pass prefills
    lm = load_model(str(test_model_dir), "int8", 1, prefill_copy=copy)
    layers = lm.model.model.language_model.layers
    kernels = [layer.self_attn.qkv_proj.linear for layer in layers] + [layer.self_attn.o_proj for layer in layers] \
        + [layer.mlp.gate_up_proj.linear for layer in layers] + [layer.mlp.down_proj for layer in layers]
    assert {isinstance(k, ByRows) for k in kernels} == {copy}  # every decoder projection, or none
    assert not isinstance(lm.model.lm_head, ByRows)  # a prefill's logits are a few rows: fbgemm's
    engine = Engine(lm)
    answered = [engine.answer(image, QUESTIONS, 96 * 96) for image in images]
    if not copy:
        assert [(a.tokens, a.scores) for a in answered] == [(r.tokens, r.scores) for r in reference]
    elif int8_dot_products():  # oneDNN's activations in 256 levels: no further from float32's than fbgemm's
        assert [a.scores for a in answered] != [r.scores for r in reference]

        def drift(got: list[Answered]) -> float:
            return sum(abs(a - b) for one, float32 in zip(got, exact, strict=True) for key in float32.scores
                       for a, b in zip(one.scores[key], float32.scores[key], strict=True))

        assert drift(answered) <= 1.25 * drift(reference)


def test_a_later_start_packs_the_prefill_copy_behind_the_answers(
        tmp_path: Path, test_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onednn_int8, "pays", lambda: True)
    monkeypatch.setattr(loading, "int_mm_fast", lambda: True)  # the deferring start, on any host
    first = load_model(str(test_model_dir), "int8", 1, tmp_path)
    reference = Engine(first).answer(noise_image(96, 80, seed=4), QUESTIONS, 96 * 96)
    gate = threading.Event()
    lm = load_model(str(test_model_dir), "int8", 1, tmp_path, pack_gate=gate)
    assert lm.packer is not None
    down = lambda: lm.model.model.language_model.layers[0].mlp.down_proj  # noqa: E731
    assert isinstance(down(), IntMatmulLinear)
    gate.set()
    assert lm.packer.wait(60)
    assert lm.packer.failed is None
    assert isinstance(down(), ByRows)
    assert isinstance(lm.model.model.language_model.layers[0].mlp.gate_up_proj.linear, ByRows)
    answered = Engine(lm).answer(noise_image(96, 80, seed=4), QUESTIONS, 96 * 96)
    assert (answered.tokens, answered.scores) == (reference.tokens, reference.scores)
