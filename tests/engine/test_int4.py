"""Precision int4: int8's model with four-bit copies of the language model's decoder layers, which take its decode
steps (edgevl.engine.int4_kernel); its prefill, vision tower and output head stay int8."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgevl.engine import onednn_int8
from edgevl.engine.engine import Engine
from edgevl.engine.int4_kernel import Int4Linear
from edgevl.engine.kernels import FbgemmLinear, IntMatmulLinear
from edgevl.engine.loading import load_model
from edgevl.engine.onednn_int8 import ByRows, OnednnInt8Linear
from edgevl.engine.prepared import PreparedReader
from edgevl.questions import Question
from tests.harness.images import noise_image
from tests.harness.prepared import answer

QUESTIONS = [Question(id="d", ask="Is there a defect?", type="yes_no"),
             Question(id="t", ask="Read the label.", max_tokens=6)]


def test_every_decoder_matrix_is_int4_alone_or_with_onednns_copy_for_its_prefill(grouped_model_dir: Path) -> None:
    lm = load_model(str(grouped_model_dir), "int4", 1, prefill_copy=False)
    decoder = lm.model.model.language_model.layers
    alone = [m for m in decoder.modules() if isinstance(m, Int4Linear)]
    # Two layers: the fused query-key-value, the output, the fused gate-up and the down projection each.
    assert len(alone) == 8
    assert not any(isinstance(m, ByRows | FbgemmLinear | OnednnInt8Linear) for m in decoder.modules())
    outside = [m for name, m in lm.model.named_modules() if not name.startswith("model.language_model.layers")]
    assert not any(isinstance(m, Int4Linear) for m in outside), "the vision tower and the head stay int8"

    copied = load_model(str(grouped_model_dir), "int4", 1, prefill_copy=True).model.model.language_model.layers
    split = [m for m in copied.modules() if isinstance(m, ByRows)]
    if not onednn_int8.pays():  # no AMX: no copy, whatever the cap allows
        assert split == []
        return
    assert len(split) == 8
    layer = split[0]
    assert isinstance(layer.few, Int4Linear)
    assert isinstance(layer.many, OnednnInt8Linear)
    torch.manual_seed(0)
    step, prompt = torch.randn(1, 1, layer.few.in_features), torch.randn(1, 40, layer.few.in_features)
    with torch.inference_mode():
        assert torch.equal(layer(step), layer.few(step))
        assert torch.equal(layer(prompt), layer.many(prompt))


def test_a_matrix_without_whole_groups_stays_int8(test_model_dir: Path) -> None:
    """The test model's hidden size (64) is half a group: only its down projections (128 inputs) are int4's."""
    lm = load_model(str(test_model_dir), "int4", 1, prefill_copy=False)
    decoder = lm.model.model.language_model.layers
    four = {name for name, m in decoder.named_modules() if isinstance(m, Int4Linear)}
    assert four == {"0.mlp.down_proj", "1.mlp.down_proj"}
    for name, m in decoder.named_modules():
        if name.endswith(("qkv_proj.linear", "gate_up_proj.linear", "o_proj")):
            assert isinstance(m, FbgemmLinear | IntMatmulLinear), name
    answered = Engine(lm).answer(noise_image(96, 80, seed=2), QUESTIONS, 96 * 96)
    assert set(answered.answers) == {"d", "t"}


def test_int4_answers_every_question_type(grouped_model_dir: Path) -> None:
    lm = load_model(str(grouped_model_dir), "int4", 1)
    questions = [*QUESTIONS, Question(id="c", ask="Which type?", type="choice", options=("A", "B", "C")),
                 Question(id="n", ask="How many?", type="number")]
    answered = Engine(lm).answer(noise_image(96, 80, seed=5), questions, 96 * 96)
    answers = answered.answers
    assert list(answers) == ["d", "t", "c", "n"]
    # A number held to its grammar: a value, or the one error of an answer cut short by its length.
    assert "value" in answers["n"] or answers["n"]["error"]["code"] in ("truncated", "value_out_of_range")
    assert 0.0 <= answers["d"]["p_yes"] <= 1.0
    assert answers["d"]["value"] in (True, False)
    assert answers["c"]["value"] in ("A", "B", "C")
    assert isinstance(answers["t"]["text"], str)


def test_a_later_start_without_the_prefill_copy_never_maps_the_decoder_layers_int8_rows(
        grouped_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its prepared file keeps them for a start with oneDNN's copy; one without reads only the groups."""
    prepared = tmp_path / "prepared"
    first = load_model(str(grouped_model_dir), "int4", 1, prepared, prefill_copy=False)
    assert first.prepared == "written"
    want = answer(first)
    checked: list[str] = []
    original = PreparedReader._checked_array

    def checking(self: PreparedReader, name: str) -> object:
        checked.append(name)
        return original(self, name)

    monkeypatch.setattr(PreparedReader, "_checked_array", checking)
    later = load_model(str(grouped_model_dir), "int4", 1, prepared, prefill_copy=False)
    assert later.prepared == "read"
    if later.packer is not None:
        assert later.packer.wait(60)
    assert answer(later) == want
    decoder = [name for name in checked if name.startswith("model.language_model.layers.")]
    assert len([name for name in decoder if name.endswith(".int4.packed")]) == 8
    assert not [name for name in decoder if name.endswith((".weight.q", ".weight.scales"))]
    assert any(name.startswith("model.visual.") and name.endswith(".q") for name in checked), "int8's stay read"
