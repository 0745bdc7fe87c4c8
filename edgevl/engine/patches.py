"""The vision tower's patch embedding as one matrix product, for the int8 and int4 precisions.

Qwen3-VL embeds each patch with a 3-D convolution whose kernel is its stride: every output is one weight row times
one patch's pixels, which the image processor already hands over flattened in the kernel's order (channels,
frames, rows, columns).  torch's convolution took 190 ms for an A4 page's 3,952 patches and 35 ms for a W4
frame's 720; the same weights as a matrix (a view of the convolution's, no copy) take 57 ms and 10 ms (2-core
AMD EPYC with AVX-512, float32).  The two sum each output's products in different orders, so their outputs
agree to float32's rounding, not bit for bit: float32 keeps the convolution, its answers token-identical to
transformers' ``generate()``; int8 and int4 round the tower's products far more than this already.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class MatrixPatchEmbed(nn.Module):
    """A patch embedding whose ``nn.Conv3d`` kernel is its stride, as ``F.linear`` on the flattened patches:
    (patches, channels * frames * rows * columns) in, (patches, embed_dim) out, as the embedding it replaces."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        self.embed_dim = conv.out_channels
        # Buffers, so that the module's tensors are the model's as the convolution's were.
        self.register_buffer("weight", conv.weight.detach().reshape(self.embed_dim, -1))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, self.weight.shape[1]).to(self.weight.dtype)
        return F.linear(flat, self.weight, self.bias)


def _is_patch_convolution(conv: nn.Conv3d) -> bool:
    """Whether ``conv`` multiplies each patch alone: its kernel is its stride, with no padding, dilation or groups."""
    return (tuple(conv.kernel_size) == tuple(conv.stride)
            and tuple(conv.padding) == (0, 0, 0) and tuple(conv.dilation) == (1, 1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def use_matrix_patch_embedding(model: Any) -> bool:
    """``model``'s vision tower embeds its patches with one matrix product; whether it could."""
    visual = model.model.visual
    conv = getattr(getattr(visual, "patch_embed", None), "proj", None)
    if not isinstance(conv, nn.Conv3d) or not _is_patch_convolution(conv):
        return False
    visual.patch_embed = MatrixPatchEmbed(conv)
    return True
