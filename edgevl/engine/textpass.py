"""The language model's passes over the packed sequence, computed layer by layer without transformers'
per-call machinery.

A decode step of one row multiplies each weight once and does little else, so what surrounds the products
weighs on it: transformers' decoder layer wraps every call in keyword checks, a checkpointing layer's
``__call__``, an attention-interface lookup and a mask builder, and its RMSNorm is eight tensor operations
dispatched from Python.  Measured in an int8 W4 decode step (2B shapes, 2-core AMD EPYC, torch profiler):
73 ms of wall time held 43 ms of products, 6 ms of attention, 8 ms of other tensor operations and 17 ms
of Python between them.  This pass, alternated with transformers' forward in one process (a 48-token
answer, ten pairs): 61-82 ms a step against 71-91 ms, faster in every pair (medians 67 and 79 ms).

It runs the same modules' weights through the same arithmetic in the same order, so its outputs are
transformers' bit for bit (tests/engine/test_textpass.py; float32's answers stay token-identical to
``generate()``): the norm is torch's ``rms_norm``, one call doing transformers' RMSNorm's operations, with
the weight applied after it as there; the rotary embedding is computed once per pass and applied by
transformers' own function; the fused int8 projections (``edgevl.engine.fusion``) are called once and split;
each layer's cache is written directly.  Where the query and key come from one fused call they sit side by
side in its output, and are normed and rotated there as one tensor by the same operations: one norm over
both (each head's weight applied after it), one rotation: seven operations a layer instead of fourteen.
An image's prefix keeps transformers' forward: one long pass whose Python is nothing beside its products,
and the only one that adds the vision tower's deepstack features.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

from edgevl.engine.attention import grouped_sdpa_attention
from edgevl.engine.fusion import FusedLinear


def _norm(x: torch.Tensor, module: Any) -> torch.Tensor:
    # torch's rms_norm normalizes in float32 and rounds to the input's type, as transformers' RMSNorm does; the
    # weight is applied after that rounding, as there (torch's would apply it before, in float32).
    weight: torch.Tensor = module.weight
    normed = F.rms_norm(x, weight.shape, None, module.variance_epsilon)
    return weight * normed


def _projections(owner: Any, fused: str, members: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of ``owner``'s projections of ``x``: one call where they are fused, else one each."""
    kernel = getattr(owner, fused, None)
    if isinstance(kernel, FusedLinear):
        return list(kernel.outputs(x))
    return [getattr(owner, member)(x) for member in members]


class Rotation(NamedTuple):
    """A pass's rotary embedding: transformers' cosine and sine (batch, tokens, head_dim), and the sine with the
    rotation's sign folded in for the heads-last layout (batch, tokens, 1, head_dim)."""

    cos: torch.Tensor
    sin: torch.Tensor
    turned: torch.Tensor

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor) -> Rotation:
        # rotate_half(x) * sin is cat(-x2, x1) * sin, which is cat(x2, x1) * cat(-sin1, sin2) bit for bit (a
        # product's sign is its factors'): the sign is folded into the sine once per pass, not negated per layer.
        half = sin.shape[-1] // 2
        return cls(cos, sin, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(2))


def _attention(layer_index: int, attn: Any, x: torch.Tensor, rotation: Rotation, mask: torch.Tensor, cache: Any,
               plan: dict[str, Any]) -> torch.Tensor:
    input_shape = x.shape[:-1]
    query, key, value = _query_key_value(attn, x, rotation)
    key, value = cache.layers[layer_index].update(key, value, **plan)
    out, _ = grouped_sdpa_attention(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling, **plan)
    projected: torch.Tensor = attn.o_proj(out.reshape(*input_shape, -1).contiguous())
    return projected


def _query_key_value(attn: Any, x: torch.Tensor,
                     rotation: Rotation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value heads of ``x``, (batch, heads, tokens, head_dim), normed and rotated."""
    kernel = getattr(attn, "qkv_proj", None)
    if isinstance(kernel, FusedLinear) and _joinable(attn, x):
        return _joint_query_key_value(attn, kernel, x, rotation)
    hidden_shape = (*x.shape[:-1], -1, attn.head_dim)
    q, k, v = _projections(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), x)
    query = _norm(q.view(hidden_shape), attn.q_norm).transpose(1, 2)
    key = _norm(k.view(hidden_shape), attn.k_norm).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, rotation.cos, rotation.sin)
    return query, key, v.view(hidden_shape).transpose(1, 2)


def _joinable(attn: Any, x: torch.Tensor) -> bool:
    """Whether the query and key heads can be normed as one tensor: one epsilon, and weights of the
    activations' type (so that applying each in place rounds as transformers' product does)."""
    q_norm, k_norm = attn.q_norm, attn.k_norm
    return bool(q_norm.variance_epsilon == k_norm.variance_epsilon
                and q_norm.weight.dtype == k_norm.weight.dtype == x.dtype)


def _joint_query_key_value(attn: Any, kernel: FusedLinear, x: torch.Tensor,
                           rotation: Rotation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The heads from one fused call, whose output holds the query and key heads side by side: they are normed
    and rotated as one tensor, each head with its own norm's weight, by transformers' operations on each.  A
    one-row decode step's small operations and their Python are much of its time beside the products."""
    dim = attn.head_dim
    query_size, key_size, _ = kernel.sizes
    out = kernel(x)
    heads = out[..., : query_size + key_size].view(*x.shape[:-1], -1, dim)
    split = query_size // dim
    normed = F.rms_norm(heads, (dim,), None, attn.q_norm.variance_epsilon)
    normed[..., :split, :].mul_(attn.q_norm.weight)  # each weight after the norm, as transformers applies it
    normed[..., split:, :].mul_(attn.k_norm.weight)
    half = dim // 2
    swapped = torch.cat((normed[..., half:], normed[..., :half]), dim=-1)
    rotated = normed * rotation.cos.unsqueeze(2) + swapped * rotation.turned
    value = out[..., query_size + key_size:].view(*x.shape[:-1], -1, dim)
    return rotated[:, :, :split].transpose(1, 2), rotated[:, :, split:].transpose(1, 2), value.transpose(1, 2)


def _mlp(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = _projections(mlp, "gate_up_proj", ("gate_proj", "up_proj"), x)
    out: torch.Tensor = mlp.down_proj(mlp.act_fn(gate) * up)
    return out


def run(text_model: Any, embeds: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: Any,
        plan: dict[str, Any]) -> torch.Tensor:
    """The final hidden states (1, tokens, hidden) of a pass of ``embeds`` under the boolean ``mask``
    (1, 1, tokens, slots); ``position_ids`` (4, 1, tokens) holds each token's cache slot, then its three rotary
    positions; ``plan`` the stream mode's frame spans, if any."""
    rotation = Rotation.of(*text_model.rotary_emb(embeds, position_ids[1:]))
    hidden = embeds
    for index, layer in enumerate(text_model.layers):
        attended = _attention(index, layer.self_attn, _norm(hidden, layer.input_layernorm), rotation, mask, cache,
                              plan)
        hidden = hidden + attended
        hidden = hidden + _mlp(layer.mlp, _norm(hidden, layer.post_attention_layernorm))
    return _norm(hidden, text_model.norm)
