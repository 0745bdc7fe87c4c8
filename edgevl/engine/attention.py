"""The language model's attention: transformers' SDPA attention, with grouped key/value heads shared by the
kernel instead of copied.

With an explicit mask and more than one query row, which is every pass of the packed sequence (several
questions, several frames), transformers' SDPA path repeats each key/value head for the query heads that
share it: a copy of the whole cache per layer per pass, most of a stream-mode decode step.  SDPA takes the
groups itself (``enable_gqa``) and computes the same values bit for bit.  Every other call (no mask, one
query row, the vision tower) is transformers' own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "edgevl_sdpa"


def grouped_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    groups = int(getattr(module, "num_key_value_groups", 1))
    if attention_mask is None or query.shape[2] == 1 or groups == 1 or kwargs.get("position_bias") is not None:
        out: tuple[torch.Tensor, None] = sdpa_attention_forward(module, query, key, value, attention_mask,
                                                                dropout=dropout, scaling=scaling, **kwargs)
        return out
    # What transformers computes for a masked multi-row pass (is_causal is off whenever a mask is given).
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                            scale=scaling, enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None


def use_grouped_attention(model: Any) -> None:
    """The language model of ``model`` attends with ``grouped_sdpa_attention``; its vision tower is unchanged."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks transformers makes for SDPA
    model.model.language_model.config._attn_implementation = NAME
