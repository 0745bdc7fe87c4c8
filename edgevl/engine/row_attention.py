"""A decode step's attention for precision int4: one query row of every head over the bfloat16 cache, computed by
``attend.c`` (built into the int4 kernel's library, ``edgevl.engine.int4_kernel``).

A page's long answer attends over a thousand slots in every layer at every step.  torch's SDPA, given one row
and a mask (transformers packs the query heads that share a key/value head as its rows), took 350 us a layer
there: a quarter of the step, at 13 GB/s of a memory that reads at 70.  ``attend.c`` reads each slot's key and
value once for all the heads that share them, in float32 arithmetic with the query unrounded (SDPA rounded it to
the cache's bfloat16 and its output back).  The stream mode's frames each attend over their own span by the same
call, so a frame's row computes the same alone and in company.  Any other pass (several rows, a float32 cache,
a layout the kernel does not take) keeps SDPA.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from edgevl.engine import int4_kernel

ATTRIBUTE = "row_attention"  # the attention module's attribute that holds its RowAttention
MAX_GROUP = 16  # attend.c's limit on the query heads sharing one key/value head


class RowAttention:
    """One query row attending over a bfloat16 cache, in C; ``limit`` caps the instruction set (tests)."""

    def __init__(self, lib: ctypes.CDLL, limit: int = 2) -> None:
        self._call = lib.edgevl_attend_rows
        self.isa = int4_kernel.level(lib, limit)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 scaling: float) -> torch.Tensor | None:
        """The output (1, 1, heads, dim) in float32 of ``query`` (1, heads, 1, dim, float32) over ``key`` and
        ``value`` (1, kv_heads, slots, dim, bfloat16) where the boolean ``mask`` (broadcast to (slots,)) lets it
        see; None where the pass is not one the kernel takes."""
        if not _takes(query, key, value, mask):
            return None
        heads, dim = query.shape[1], query.shape[3]
        kv_heads, slots = key.shape[1], key.shape[2]
        q = query.reshape(heads, dim).contiguous()
        seen = (torch.ones(slots, dtype=torch.bool) if mask is None
                else mask.reshape(-1, slots)[-1].contiguous())  # a (1, 1, 1, slots) mask: its one row
        out = torch.empty(heads, dim, dtype=torch.float32)
        failed = self._call(q.data_ptr(), key.data_ptr(), value.data_ptr(), key.stride(1), key.stride(2),
                            value.stride(1), value.stride(2), seen.data_ptr(), out.data_ptr(), heads, kv_heads, slots,
                            dim, float(scaling), torch.get_num_threads(), self.isa)
        if failed == -1:
            raise MemoryError("the row attention kernel could not allocate its scores")
        if failed:
            return None
        return out.view(1, 1, heads, dim)


def _takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    if query.dim() != 4 or query.shape[0] != 1 or query.shape[2] != 1 or query.dtype != torch.float32:
        return False
    if key.dtype != torch.bfloat16 or value.dtype != torch.bfloat16 or key.shape != value.shape:
        return False
    if key.shape[0] != 1 or key.shape[3] != query.shape[3] or key.stride(3) != 1 or value.stride(3) != 1:
        return False
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads == 0 or heads % kv_heads or heads // kv_heads > MAX_GROUP:
        return False
    slots = key.shape[2]
    return mask is None or (mask.dtype == torch.bool and mask.numel() == slots and mask.shape[-1] == slots)


def install(model: Any, lib: ctypes.CDLL) -> None:
    """Every attention layer of ``model``'s language model attends one row over its bfloat16 cache in C."""
    kernel = RowAttention(lib)
    for layer in model.model.language_model.layers:
        setattr(layer.self_attn, ATTRIBUTE, kernel)
