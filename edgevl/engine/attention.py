"""Attention: the language model's is transformers' SDPA attention with grouped key/value heads shared by the
kernel instead of copied; an int8 vision tower's may attend in bfloat16.

With an explicit mask and more than one query row, which is every pass of the packed sequence (several
questions, several frames), transformers' SDPA path repeats each key/value head for the query heads that
share it: a copy of the whole cache per layer per pass, most of a stream-mode decode step.  SDPA takes the
groups itself (``enable_gqa``) and computes the same values bit for bit.  Every other call (no mask, one
query row, the vision tower) is transformers' own.

The vision tower attends every patch of an image to every other in each of its layers: at an A4 page's
3,952 patches that was 8.3 s of the int8 tower's 14.7 s (torch profiler, 2-core host), at float32's
SDPA rate.  Where the CPU multiplies bfloat16 in AMX tiles (``kernels.bfloat16_attention_fast``), an int8
model's vision tower attends in bfloat16: 2.4-2.6x faster.  Its queries, keys and values come from int8
products whose inputs were rounded to 256 levels per tensor, so bfloat16's 8-bit mantissa adds little
to what int8 already rounds (tests/engine/test_attention.py sets the two against float32 attention).
float32 keeps float32 attention: its answers are token-identical to transformers' ``generate()``.

An int8 model's cache holds bfloat16 (``kvcache.stored_dtype``): its language model's queries are rounded to
bfloat16 to attend over it, and the output comes back in the queries' type.  An int4 model's one-row passes
attend over it in C instead (``edgevl.engine.row_attention``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from edgevl.engine import row_attention, spans

NAME = "edgevl_sdpa"
VISION_NAME = "edgevl_bfloat16_sdpa"


def grouped_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    if key.dtype != query.dtype:  # a cache holding bfloat16 (kvcache.stored_dtype): attends in it
        kernel = getattr(module, row_attention.ATTRIBUTE, None)  # precision int4's one-row passes
        if kernel is not None and kwargs.get("position_bias") is None:
            plan = spans.of(kwargs)
            if plan is not None and attention_mask is not None:  # each frame's rows come back here, unrounded
                return _by_frame(module, query, key, value, attention_mask, plan, dropout, scaling,
                                 spans.without(kwargs))
            own = kernel(query, key, value, attention_mask, query.shape[-1] ** -0.5 if scaling is None else scaling)
            if own is not None:
                return own, None
        rounded, _ = grouped_sdpa_attention(module, query.to(key.dtype), key, value, attention_mask, dropout,
                                            scaling, **kwargs)
        return rounded.to(query.dtype), None
    plan = spans.of(kwargs)
    if plan is not None and attention_mask is not None:
        return _by_frame(module, query, key, value, attention_mask, plan, dropout, scaling, spans.without(kwargs))
    groups = int(getattr(module, "num_key_value_groups", 1))
    if attention_mask is None or query.shape[2] == 1 or groups == 1 or kwargs.get("position_bias") is not None:
        out: tuple[torch.Tensor, None] = sdpa_attention_forward(module, query, key, value, attention_mask,
                                                                dropout=dropout, scaling=scaling, **kwargs)
        return out
    # What transformers computes for a masked multi-row pass (is_causal is off whenever a mask is given).
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                            scale=scaling, enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None


def _by_frame(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: torch.Tensor, plan: spans.FrameSpans, dropout: float, scaling: float | None,
              kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    """Each frame's rows attend over the frame's span alone; the output as one pass's, (batch, rows, heads,
    dim)."""
    out = query.new_empty((query.shape[0], query.shape[2], query.shape[1], query.shape[3]))
    for rows, start, end in plan.groups:
        part, _ = grouped_sdpa_attention(module, query[:, :, rows], key[:, :, start:end], value[:, :, start:end],
                                         mask[:, :, rows, start:end], dropout=dropout, scaling=scaling, **kwargs)
        out[:, rows] = part
    return out, None


def use_grouped_attention(model: Any) -> None:
    """The language model of ``model`` attends with ``grouped_sdpa_attention``; its vision tower is unchanged."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks transformers makes for SDPA
    model.model.language_model.config._attn_implementation = NAME


def bfloat16_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention on bfloat16 copies of the inputs, the output in the inputs' type."""
    mask = attention_mask if attention_mask is None or attention_mask.dtype == torch.bool else attention_mask.bfloat16()
    out, _ = sdpa_attention_forward(module, query.bfloat16(), key.bfloat16(), value.bfloat16(), mask,
                                    dropout=dropout, scaling=scaling, **kwargs)
    return out.to(query.dtype), None


def use_bfloat16_vision_attention(model: Any) -> None:
    """The vision tower of ``model`` attends with ``bfloat16_sdpa_attention``; its language model is unchanged."""
    from transformers import AttentionInterface

    AttentionInterface.register(VISION_NAME, bfloat16_sdpa_attention)
    model.model.visual.config._attn_implementation = VISION_NAME
