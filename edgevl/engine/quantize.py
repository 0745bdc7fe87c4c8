"""int8 weights for the CPU.

Measured on the 2-core appliance (docs/performance.md): fbgemm's dynamically
quantized Linear (int8 weights per output channel, activations quantized per
call) runs a 2048x6144 projection at ~60 GFLOP/s for one token and ~300 GFLOP/s
for a prefill, against ~10 and ~140 for float32; ``torch._int_mm`` and
``torch._weight_int8pack_mm`` ran at 1.4 and 4 GFLOP/s here and are not used.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

# Rows quantized at a time, so that a 151936 x 2048 output head never exists in
# float32 in memory (1.2 GB) while it is converted.
_CHUNK_ROWS = 8192


def _per_channel_qint8(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8 quantization, done in row chunks."""
    rows = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float64)
    for start in range(0, rows, _CHUNK_ROWS):
        block = weight[start : start + _CHUNK_ROWS].float()
        scale = block.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q[start : start + _CHUNK_ROWS] = torch.round(block / scale[:, None]).clamp(-127, 127).to(torch.int8)
        scales[start : start + _CHUNK_ROWS] = scale.double()
    zero_points = torch.zeros(rows, dtype=torch.int64)
    return torch._make_per_channel_quantized_tensor(q, scales, zero_points, 0)


def int8_linear(linear: nn.Linear) -> nn.Module:
    """An fbgemm dynamic-int8 replacement for ``linear`` (the float weight can be freed afterwards)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch announces the move of this API to torchao
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

        qlinear = DynamicQuantLinear(
            linear.in_features, linear.out_features, bias_=linear.bias is not None, dtype=torch.qint8
        )
    bias = linear.bias.detach().float() if linear.bias is not None else None
    qlinear.set_weight_bias(_per_channel_qint8(linear.weight.detach()), bias)
    return qlinear


class CompactEmbedding(nn.Module):
    """Token embedding stored in bfloat16 and returned in float32.

    A lookup only copies rows, so the halved table costs no speed; it saves
    0.6 GB on the 2B model in int8 mode, where the table is the largest tensor left.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).float()


def quantize_linears(module: nn.Module, prefix: str = "") -> int:
    """Replace every materialised ``nn.Linear`` below ``module`` by its int8 form; returns the count."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and not child.weight.is_meta:
            setattr(module, name, int8_linear(child))
            count += 1
        else:
            count += quantize_linears(child, f"{prefix}{name}.")
    return count
