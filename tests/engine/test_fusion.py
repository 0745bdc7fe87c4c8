"""A decoder layer's projections of one input, computed by one int8 kernel: the very outputs of the separate
kernels, for every int8 kernel, prepared or not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edgevl.engine import fusion, kernels
from edgevl.engine.engine import Engine
from edgevl.engine.loading import LoadedModel, load_model
from edgevl.questions import Question
from tests.harness.images import noise_image

QUESTIONS = [
    Question(id="d", ask="Is there a defect?", type="yes_no"),
    Question(id="c", ask="Which type?", type="choice", options=("A", "B", "C")),
    Question(id="t", ask="Read the label.", max_tokens=8),
]


def _answers(lm: LoadedModel) -> tuple[object, object]:
    answered = Engine(lm).answer(noise_image(96, 80, seed=6), QUESTIONS, 96 * 96)
    return answered.tokens, answered.scores


def _logits(lm: LoadedModel) -> torch.Tensor:
    with torch.inference_mode():
        ids = torch.arange(3, 40).view(1, -1)
        out: torch.Tensor = lm.model(input_ids=ids).logits
        return out


@pytest.mark.parametrize("fbgemm", [True, False], ids=["fbgemm", "int_mm"])
def test_fused_projections_compute_the_separate_kernels_outputs_bit_for_bit(
        test_model_dir: Path, monkeypatch: pytest.MonkeyPatch, fbgemm: bool) -> None:
    if fbgemm and not kernels.fbgemm_int8_available():
        pytest.skip("this torch has no fbgemm int8 Linear")
    monkeypatch.setattr(kernels, "fbgemm_int8_available", lambda: fbgemm)
    fused = load_model(str(test_model_dir), "int8", 1)
    layers = fused.model.model.language_model.layers
    assert all(isinstance(layer.self_attn.qkv_proj, fusion.FusedLinear) for layer in layers)
    assert all(isinstance(layer.mlp.gate_up_proj, fusion.FusedLinear) for layer in layers)
    assert not any(isinstance(m, nn.Linear) for m in fused.model.model.language_model.modules())
    with monkeypatch.context() as m:
        m.setattr(fusion, "group_of", lambda path: None)  # every projection its own kernel, as before fusing
        separate = load_model(str(test_model_dir), "int8", 1)
    assert not any(isinstance(m, fusion.FusedLinear) for m in separate.model.modules())

    assert torch.equal(_logits(fused), _logits(separate))
    assert _answers(fused) == _answers(separate)
    assert all(layer.mlp.gate_up_proj._input is None for layer in layers), "no share is held after a pass"


def test_a_projection_given_another_input_computes_its_own_share() -> None:
    torch.manual_seed(0)
    kernel = nn.Linear(8, 5, bias=False)
    fused = fusion.FusedLinear(kernel, (3, 2))
    first, second = fusion.Projection(fused, 0, 8), fusion.Projection(fused, 1, 8)
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    with torch.inference_mode():
        assert torch.equal(first(x), kernel(x)[:, :3])
        assert torch.equal(second(y), kernel(y)[:, 3:]), "a share of x would be stale for y"
        assert torch.equal(second(x), kernel(x)[:, 3:])
        x.mul_(2)  # the same tensor changed in place: the first projection always computes afresh
        assert torch.equal(first(x), kernel(x)[:, :3])
        assert torch.equal(second(x), kernel(x)[:, 3:])
    assert fused._input is None
    assert [name for name, _ in nn.Sequential(fused, first, second).named_modules()] == ["", "0", "0.linear", "1",
                                                                                         "2"]


def test_the_prepared_file_holds_the_fused_rows_and_a_later_start_maps_them(test_model_dir: Path,
                                                                            tmp_path: Path) -> None:
    first = load_model(str(test_model_dir), "int8", 1, tmp_path)
    assert first.prepared == "written"
    index = json.loads(next(tmp_path.glob("*.json")).read_text())["tensors"]
    assert "model.language_model.layers.0.self_attn.qkv_proj.weight.q" in index
    assert "model.language_model.layers.0.mlp.gate_up_proj.weight.q" in index
    assert not any(".q_proj." in name or ".up_proj." in name for name in index)
    config = first.model.config.text_config
    rows = index["model.language_model.layers.0.self_attn.qkv_proj.weight.q"]["shape"][0]
    assert rows == (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    later = load_model(str(test_model_dir), "int8", 1, tmp_path)
    assert later.prepared == "read"
    if later.packer is not None:
        assert later.packer.wait(60)
    assert _answers(later) == _answers(first)


LM = "model.language_model.layers"


@pytest.mark.parametrize(("key", "fused"), [
    (f"{LM}.3.self_attn.k_proj.weight", f"{LM}.3.self_attn.qkv_proj.weight"),
    (f"{LM}.12.mlp.up_proj.weight", f"{LM}.12.mlp.gate_up_proj.weight"),
    (f"{LM}.3.self_attn.o_proj.weight", None),
    (f"{LM}.3.mlp.down_proj.weight", None),
    ("model.visual.blocks.0.attn.qkv.weight", None),
    ("model.visual.blocks.0.mlp.up_proj.weight", None),
])
def test_only_the_language_models_projections_of_one_input_are_fused(key: str, fused: str | None) -> None:
    assert fusion.fused_key(key) == fused
