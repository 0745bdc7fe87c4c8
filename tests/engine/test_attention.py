"""The language model's attention shares grouped key/value heads in the kernel and computes what transformers'
SDPA attention computes, bit for bit; an int8 vision tower's attends in bfloat16 where the CPU multiplies it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from edgevl.engine import kernels
from edgevl.engine.attention import NAME, VISION_NAME, bfloat16_sdpa_attention, grouped_sdpa_attention
from edgevl.engine.loading import load_model


class _Heads(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize(("rows", "keys", "groups", "masked"), [
    (8, 700, 2, True),  # a stream-mode decode step: the path that differs from transformers'
    (120, 340, 2, True),  # a prefill of questions
    (1, 340, 2, True),  # one row: transformers' own path
    (64, 64, 2, False),  # a prefix, causal without a mask: transformers' own path
    (8, 300, 1, True),  # no grouping (the vision tower)
])
def test_grouped_attention_is_bitwise_transformers_sdpa(rows: int, keys: int, groups: int, masked: bool) -> None:
    torch.manual_seed(rows + keys)
    query = torch.randn(1, 4 * groups, rows, 64)
    key, value = torch.randn(1, 4, keys, 64), torch.randn(1, 4, keys, 64)
    mask = None
    if masked:
        mask = torch.rand(1, 1, rows, keys) > 0.4
        mask[..., 0] = True
    module = _Heads(groups)
    ours, _ = grouped_sdpa_attention(module, query, key, value, mask, scaling=0.125)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.125)
    assert torch.equal(ours, theirs)


def test_over_a_bfloat16_cache_the_queries_are_rounded_to_it_and_the_output_is_not() -> None:
    torch.manual_seed(5)
    query = torch.randn(1, 8, 3, 64)
    key, value = torch.randn(1, 4, 200, 64), torch.randn(1, 4, 200, 64)
    mask = torch.rand(1, 1, 3, 200) > 0.3
    module = _Heads(2)
    ours, _ = grouped_sdpa_attention(module, query, key.bfloat16(), value.bfloat16(), mask, scaling=0.125)
    rounded, _ = grouped_sdpa_attention(module, query.bfloat16(), key.bfloat16(), value.bfloat16(), mask,
                                        scaling=0.125)
    exact, _ = grouped_sdpa_attention(module, query, key, value, mask, scaling=0.125)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, rounded.float())
    assert 0 < float((ours - exact).norm() / exact.norm()) < 1e-2


def test_the_language_model_attends_with_it_and_the_vision_tower_does_not(fp32_model) -> None:  # type: ignore[no-untyped-def]
    model = fp32_model.model
    assert model.model.language_model.config._attn_implementation == NAME
    assert model.model.visual.config._attn_implementation == "sdpa"
    assert model.model.language_model.config.num_key_value_heads < model.model.language_model.config.num_attention_heads


def test_bfloat16_attention_is_sdpa_within_bfloat16_rounding() -> None:
    torch.manual_seed(3)
    query, key, value = (torch.randn(1, 16, 720, 64) for _ in range(3))  # a W4 frame's patches, a vision layer
    module = _Heads(1)
    module.is_causal = False
    ours, _ = bfloat16_sdpa_attention(module, query, key, value, None, scaling=0.125)
    theirs, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.125)
    assert ours.dtype == torch.float32
    assert ours.shape == theirs.shape
    assert 0 < float((ours - theirs).norm() / theirs.norm()) < 1e-2


def _features(lm: Any, implementation: str) -> torch.Tensor:
    from edgevl.engine.prompts import preprocess_image

    lm.model.model.visual.config._attn_implementation = implementation
    image = Image.radial_gradient("L").convert("RGB").resize((320, 240))
    encoded = preprocess_image(lm, image, 256 * 256)
    with torch.inference_mode():
        features = lm.model.model.get_image_features(encoded.pixel_values, encoded.grid_thw, return_dict=True)
    return torch.cat(list(features.pooler_output))


@pytest.mark.parametrize("fast", [True, False])
def test_an_int8_vision_tower_attends_in_bfloat16_where_the_cpu_multiplies_it(
        fast: bool, test_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "bfloat16_attention_fast", lambda: fast)
    int8 = load_model(str(test_model_dir), "int8", 1)
    assert int8.model.model.visual.config._attn_implementation == (VISION_NAME if fast else "sdpa")
    assert int8.model.model.language_model.config._attn_implementation == NAME
    # float32 keeps float32 attention everywhere: its answers are token-identical to generate().
    assert load_model(str(test_model_dir), "float32", 1).model.model.visual.config._attn_implementation == "sdpa"


def test_bfloat16_attention_adds_little_to_what_int8_rounds(fp32_model, test_model_dir: Path,  # type: ignore[no-untyped-def]
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "bfloat16_attention_fast", lambda: True)
    int8 = load_model(str(test_model_dir), "int8", 1)
    reference = _features(fp32_model, "sdpa")
    in_float32 = _features(int8, "sdpa")
    in_bfloat16 = _features(int8, VISION_NAME)

    def error(features: torch.Tensor) -> float:
        return float((features - reference).norm() / reference.norm())

    assert error(in_float32) > 0
    assert in_bfloat16.dtype == reference.dtype
    assert not torch.equal(in_bfloat16, in_float32)
    assert error(in_bfloat16) < 1.1 * error(in_float32), (error(in_bfloat16), error(in_float32))
