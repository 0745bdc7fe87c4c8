"""Which matrices precision int4 takes (``edgevl.engine.int4_kernel``), without torch: the worker's kernel and the
daemon's memory estimate (``edgevl.worker.footprint``) ask the same rule."""

from __future__ import annotations

GROUP = 128  # inputs sharing a step
LANES = 16  # outputs side by side in the kernel's layout: a matrix's outputs must be a multiple


def fits(out_features: int, in_features: int) -> bool:
    """Whether a matrix has the kernel's shape: whole groups of inputs, whole blocks of outputs, and rows short
    enough that their 32-bit sums cannot overflow."""
    return 0 < in_features <= 65536 and in_features % GROUP == 0 and out_features > 0 and out_features % LANES == 0
