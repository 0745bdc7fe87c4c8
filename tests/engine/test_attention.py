"""The language model's attention shares grouped key/value heads in the kernel and computes what transformers'
SDPA attention computes, bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from edgevl.engine.attention import NAME, grouped_sdpa_attention


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


def test_the_language_model_attends_with_it_and_the_vision_tower_does_not(fp32_model) -> None:  # type: ignore[no-untyped-def]
    model = fp32_model.model
    assert model.model.language_model.config._attn_implementation == NAME
    assert model.model.visual.config._attn_implementation == "sdpa"
    assert model.model.language_model.config.num_key_value_heads < model.model.language_model.config.num_attention_heads
