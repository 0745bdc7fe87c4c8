"""The answers' cache: an int8 model's holds its keys and values in bfloat16, which adds little to what int8
rounds; float32's holds float32 (its answers token-identical to generate())."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from edgevl.engine import decoding, spans
from edgevl.engine.decoding import Branch, encode_prefix, prefill_branches
from edgevl.engine.engine import Answered, Engine, Frame
from edgevl.engine.kvcache import GrowingLayer, join, new_cache, stored_dtype
from edgevl.engine.loading import LoadedModel, load_model
from edgevl.engine.prompts import build_prompt, preprocess_image
from edgevl.questions import Question
from tests.engine.test_spans import DIM, KV_HEADS, _text_config


def test_an_int8_model_stores_bfloat16_and_the_others_what_they_compute() -> None:
    assert stored_dtype("int8") == torch.bfloat16
    assert stored_dtype("float32") is None
    assert stored_dtype("bfloat16") is None


def test_a_bfloat16_layer_stores_every_pass_rounded_across_regrowths() -> None:
    torch.manual_seed(0)
    layer = GrowingLayer(torch.bfloat16)
    written = []
    for count in (300, 1, 2, 400):  # the first regrows past its room, the last past the next
        keys, values = torch.randn(1, KV_HEADS, count, DIM), torch.randn(1, KV_HEADS, count, DIM)
        written.append((keys, values))
        held_keys, held_values = layer.update(keys, values)
    assert held_keys.dtype == held_values.dtype == torch.bfloat16
    assert layer.get_seq_length() == 703
    assert torch.equal(held_keys, torch.cat([k for k, _ in written], dim=-2).bfloat16())
    assert torch.equal(held_values, torch.cat([v for _, v in written], dim=-2).bfloat16())


def test_a_joined_bfloat16_cache_keeps_its_type_and_writes_each_token_rounded() -> None:
    caches = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        cache = new_cache(_text_config(), torch.bfloat16)
        for index in range(2):
            cache.update(torch.randn(1, KV_HEADS, 4, DIM), torch.randn(1, KV_HEADS, 4, DIM), index)
        caches.append(cache)
    joined = join(caches, [4, 4], [2, 2], _text_config())
    assert joined.layers[0].keys.dtype == torch.bfloat16
    assert all(layer.stored == torch.bfloat16 for layer in joined.layers)  # a regrowth would keep the type
    assert not joined.layers[0].keys[..., 4:6, :].any()
    new_keys, new_values = torch.randn(1, KV_HEADS, 2, DIM), torch.randn(1, KV_HEADS, 2, DIM)
    plan = spans.FrameSpans(torch.tensor([4, 10]), ())
    keys, values = joined.update(new_keys, new_values, 0, kwargs={spans.KWARG: plan})
    assert torch.equal(keys[..., [4, 10], :], new_keys.bfloat16())
    assert torch.equal(values[..., [4, 10], :], new_values.bfloat16())


def _image() -> Image.Image:
    return Image.radial_gradient("L").convert("RGB").resize((320, 240))


def _next_logprobs(lm: LoadedModel) -> tuple[torch.Tensor, Any]:
    """The log-probabilities after a yes/no question's suffix, and the cache they were computed over."""
    encoded = preprocess_image(lm, _image(), 256 * 256)
    prompt = build_prompt(lm, "Is there a visible defect on the weld seam?", encoded)
    seq = encode_prefix(lm, encoded, prompt.prefix_ids, prompt.prefix_positions)
    branch = Branch("next", prompt.suffix_ids, prompt.suffix_positions)
    prefill_branches(seq, [branch])
    assert branch.logprobs is not None
    return branch.logprobs, seq.cache


def test_an_int8_models_bfloat16_cache_adds_little_to_what_int8_rounds(
        fp32_model: LoadedModel, test_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    int8 = load_model(str(test_model_dir), "int8", 1)
    reference, reference_cache = _next_logprobs(fp32_model)
    assert reference_cache.layers[0].keys.dtype == torch.float32
    in_bfloat16, cache = _next_logprobs(int8)
    assert all(layer.keys.dtype == layer.values.dtype == torch.bfloat16 for layer in cache.layers)
    monkeypatch.setattr(decoding, "stored_dtype", lambda precision: None)
    in_float32, cache = _next_logprobs(int8)
    assert cache.layers[0].keys.dtype == torch.float32

    def error(logprobs: torch.Tensor) -> float:
        return float((logprobs.exp() - reference.exp()).norm() / reference.exp().norm())

    assert error(in_float32) > 0
    assert not torch.equal(in_bfloat16, in_float32)
    assert error(in_bfloat16) < 1.1 * error(in_float32), (error(in_bfloat16), error(in_float32))


def test_int8_frames_answered_together_decode_over_one_bfloat16_cache(test_model_dir: Path) -> None:
    engine = Engine(load_model(str(test_model_dir), "int8", 1))
    questions = [Question(id="defect", ask="Is there a defect?", type="yes_no"),
                 Question(id="label", ask="Read the label.", type="text", max_tokens=6)]
    frames = [Frame(_image(), questions, 256 * 256), Frame(_image().rotate(90), questions, 256 * 256)]
    results = engine.answer_frames(frames, force_full_length=True)
    assert all(isinstance(r, Answered) for r in results)
    assert [len(r.tokens["label"]) for r in results if isinstance(r, Answered)] == [6, 6]
