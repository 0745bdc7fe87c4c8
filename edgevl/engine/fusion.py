"""int8 projections of one input computed by one kernel call: a decoder layer's query, key and value, and its
MLP's gate and up projections.

A decode step of one row reads every int8 matrix once and does little else, so each kernel call's fixed
cost (quantizing the input, starting the threads, finishing the output) weighs on it: seven calls per
decoder layer, four once fused.  Measured on a 2-core host, one row, fbgemm: query, key and value separately 0.73 ms per
layer, together 0.46 ms; gate and up 1.60 ms, together 1.24 ms.  Both int8 kernels quantize the input from
the whole input (fbgemm per call, ``_int_mm`` per row) and give each output channel its own weight scale and
an exact integer sum, so the fused call's outputs are those of the separate calls bit for bit
(tests/engine/test_fusion.py).  float32 is not fused: its kernels may order a sum differently for a wider
matrix, and its decode step is bound by reading 6.9 GB, not by calls.

The attention and the MLP stay transformers' own: each projection is a ``Projection`` that takes its share
of the one output computed for that input.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# Sibling Linear layers of one decoder layer that take the same input, in the order the layer calls them,
# and the name of the layer computing them together.
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "mlp": ("gate_up_proj", ("gate_proj", "up_proj")),
}
_OWNER = re.compile(r"^model\.language_model\.layers\.\d+\.(self_attn|mlp)$")


def group_of(path: str) -> tuple[str, tuple[str, ...]] | None:
    """The fused layer's name and its members for the module at ``path`` (an attention or an MLP of the
    language model), or None."""
    match = _OWNER.match(path)
    return GROUPS[match.group(1)] if match else None


def fused_key(key: str) -> str | None:
    """The weight key of the fused layer that computes the checkpoint weight ``key``, if it is one of them."""
    module, _, attr = key.rpartition(".")
    owner, _, member = module.rpartition(".")
    group = group_of(owner)
    if attr != "weight" or group is None or member not in group[1]:
        return None
    return f"{owner}.{group[0]}.weight"


class FusedLinear(nn.Module):
    """One kernel for several projections of the same input; ``linear`` is the kernel over their rows end to
    end (the packer replaces it by its packed copy, as any int8 layer)."""

    def __init__(self, linear: nn.Module, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.linear = linear
        self.sizes = sizes
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every projection of ``x``, in order, from one kernel call."""
        return tuple(self(x).split(self.sizes, dim=-1))

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Projection ``index`` of ``x``: the first projection computes them all; the others take their share
        when they are given that very tensor (otherwise they compute it again, never a stale share)."""
        if index == 0 or x is not self._input:
            self._parts = self.outputs(x)
            self._input = x
        share = self._parts[index]
        if index == len(self.sizes) - 1:  # the layer calls the last one last: nothing is held until the next call
            self._input, self._parts = None, ()
        return share

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class Projection(nn.Module):
    """One of a ``FusedLinear``'s projections, where the layer calls it."""

    def __init__(self, fused: FusedLinear, index: int, in_features: int) -> None:
        super().__init__()
        # A plain reference, not a submodule: the fused layer is registered once, beside its projections.
        self.__dict__["fused"] = fused
        self.index = index
        self.in_features = in_features
        self.out_features = fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused: FusedLinear = self.__dict__["fused"]
        return fused.part(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused={self.index}"


def install(owner: nn.Module, name: str, members: tuple[str, ...], kernel: nn.Module,
            sizes: tuple[int, ...], in_features: int) -> None:
    """Put the fused layer ``name`` on ``owner`` and a ``Projection`` in place of each member."""
    fused = FusedLinear(kernel, sizes)
    setattr(owner, name, fused)
    for index, member in enumerate(members):
        setattr(owner, member, Projection(fused, index, in_features))
