"""The packed sequence's passes (edgevl.engine.textpass) compute what transformers' forward of the same language
model computes, bit for bit, in every precision: alone and in a stream of frames, prefilling questions and
decoding answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

from edgevl.engine import textpass
from edgevl.engine.engine import Answered, Engine, Frame
from edgevl.engine.loading import load_model
from edgevl.questions import Question

QUESTIONS = [
    Question(id="defect", ask="Is there a visible defect?", type="yes_no"),
    Question(id="connector", ask="Which connector is fitted?", type="choice", options=("type-A", "type-B")),
    Question(id="label", ask="Read the label.", type="text", max_tokens=5),
]


def _stock(text_model: Any, embeds: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: Any,
           plan: dict[str, Any]) -> torch.Tensor:
    """transformers' own forward of the language model on the same pass."""
    out = text_model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask, cache=cache,
                     use_cache=True, **plan)
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


def _passes(engine: Engine, frames: list[Frame], run: Any,
            monkeypatch: pytest.MonkeyPatch) -> tuple[list[torch.Tensor], list[Answered]]:
    """Every pass's final hidden states and the answers, with the packed sequence's passes made by ``run``."""
    seen: list[torch.Tensor] = []

    def recorded(*args: Any) -> torch.Tensor:
        hidden: torch.Tensor = run(*args)
        seen.append(hidden.clone())
        return hidden

    monkeypatch.setattr(textpass, "run", recorded)
    results = engine.answer_frames(frames, force_full_length=True)
    assert all(isinstance(r, Answered) for r in results), results
    return seen, [r for r in results if isinstance(r, Answered)]


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("count", [1, 2])
def test_every_pass_is_transformers_forward_bit_for_bit(test_model_dir: Path, precision: str, count: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    lm = load_model(str(test_model_dir), precision, 1)  # type: ignore[arg-type]
    torch.manual_seed(7)
    with torch.no_grad():  # the test model's norms are ones: a weight misapplied would go unseen
        for module in lm.model.model.language_model.modules():
            if isinstance(module, Qwen3VLTextRMSNorm):
                module.weight.copy_(1 + torch.randn(module.weight.shape) / 4)
    engine = Engine(lm)
    picture = Image.radial_gradient("L").convert("RGB").resize((320, 240))
    frames = [Frame(picture.rotate(90 * i), QUESTIONS, 256 * 256) for i in range(count)]
    lean, lean_answers = _passes(engine, frames, textpass.run, monkeypatch)
    stock, stock_answers = _passes(engine, frames, _stock, monkeypatch)
    # Each frame's suffixes and options in one pass, then one pass per decode step (every frame's rows
    # together, the first token coming from the prefill).
    assert len(lean) == len(stock) == count + 4
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(lean, stock, strict=True))
    assert [a.tokens for a in lean_answers] == [a.tokens for a in stock_answers]
    assert [a.answers for a in lean_answers] == [a.answers for a in stock_answers]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 7, 64), (1, 3, 4, 32), (1, 300, 2048)])
def test_the_norm_is_transformers_bit_for_bit(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    torch.manual_seed(len(shape) * 1000 + shape[1])
    norm = Qwen3VLTextRMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
    x = (torch.randn(shape) * 3).to(dtype)
    with torch.inference_mode():
        expected = norm(x)
        got = textpass._norm(x, norm)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected)
