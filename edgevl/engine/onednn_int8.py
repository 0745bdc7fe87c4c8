"""The int8 vision tower, and the language model's prefill, on oneDNN's int8 matrix product where the CPU has AMX.

The vision tower only ever multiplies many rows at once (every patch of an image), so its int8 kernel is
chosen for that: on a CPU with AMX's int8 tiles, oneDNN's int8 product (``onednn::qlinear_pointwise``, the
kernel torch's own int8 graphs run) beat fbgemm's dynamic Linear on every vision shape.  Measured on a 2-core
Intel Xeon with AMX, 1,024 rows: 1024->3072 9.2 ms (fbgemm) against 4.7 ms, 1024->4096 16.5 against 9.4,
4096->1024 14.2 against 10.1; the whole tower of the 2B model 0.93-1.07 s against 0.65-0.80 s for a W4
frame, 8.1-9.5 against 7.3-7.7 s for an A4 page.  Without AMX (oneDNN held to AVX-512 VNNI) it was from 0.4x
to 1.3x fbgemm's speed.

The language model decodes on fbgemm everywhere: with AMX, the whole model's one-row decode step took 0.116 s
against 0.097 s on oneDNN (its products alone 134 ms a step against fbgemm's 71 ms, on a 2-core Xeon with AMX).
Its prefill (a frame's prompt, its questions, a page's thousand tokens) is where oneDNN's AMX tiles pay, so
there, where the memory cap leaves room, each of its layers keeps a second packed copy of the same int8 rows
for oneDNN and multiplies many rows with it (``ByRows``): on that Xeon a W4 frame took a median 3.87 s against
4.68 s, for 1.4 GB more (the daemon counts it in its estimate and leaves it out where the cap would not hold it,
``edgevl.worker.footprint``).

Activations are quantized per call over the whole input, asymmetric in 256 levels, as fbgemm does but
without its reduced range: the tower's outputs are no further from float32's (tests/engine/test_onednn_int8.py).
Plain tensor arithmetic quantizes them, not torch's quantized tensors, which torch has deprecated.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from edgevl.engine import kernels

VISION = "model.visual."  # the paths of the vision tower's layers (its blocks, merger and deepstack mergers)
LANGUAGE_MODEL = "model.language_model."  # the paths of the decoder layers' projections
# Rows from which a language-model layer with a prefill copy multiplies on oneDNN.  A decode step has one row a
# generated answer (up to max_batch, 8 on 2 cores; a stream of eight frames, eight), where fbgemm was faster.
PREFILL_ROWS = 32
_PACKED_ROWS = 1024  # the rows oneDNN lays the weights out for: about a W4 frame's patches


def available() -> bool:
    """Whether this torch has oneDNN's int8 Linear."""
    return hasattr(torch.ops.onednn, "qlinear_prepack") and hasattr(torch.ops.onednn, "qlinear_pointwise")


@functools.cache
def pays() -> bool:
    """Whether the vision tower's int8 layers run on oneDNN here: a CPU with AMX's int8 tiles."""
    return kernels.cpu_has("amx_int8") and available()


def for_layer(path: str) -> bool:
    """Whether the int8 layer at ``path`` runs on oneDNN (a vision tower's layer, on a CPU where that pays)."""
    return path.startswith(VISION) and pays()


def packed(path: str, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
           prefill_copy: bool, four: nn.Module | None = None) -> nn.Module:
    """The packed int8 kernel for the layer at ``path`` from its rows: oneDNN's for the vision tower where that
    pays; for a language-model layer fbgemm's, with oneDNN's copy for its prefill (``ByRows``) if
    ``prefill_copy`` is allowed and pays here; fbgemm's for the rest (``kernels.int8_kernel``).

    ``four``: the layer's int4 kernel (precision int4, ``edgevl.engine.int4_kernel``), which multiplies every
    row but a prefill's where oneDNN's copy is kept."""
    if for_layer(path):
        return OnednnInt8Linear(q, scales, bias)
    if four is not None:
        return ByRows(four, OnednnInt8Linear(q, scales, bias)) if prefill_copy and pays() else four
    few = kernels.int8_kernel(q, scales, bias)
    if prefill_copy and path.startswith(LANGUAGE_MODEL) and pays():
        return ByRows(few, OnednnInt8Linear(q, scales, bias))
    return few


class ByRows(nn.Module):
    """One int8 layer with two packed copies of its rows: ``few`` (fbgemm) multiplies a decode step's rows,
    ``many`` (oneDNN) a prefill's, from ``PREFILL_ROWS`` rows on.

    Both quantize the activations per call from the whole input with each output channel's own weight scale;
    they differ in the activations' levels (fbgemm's 128 in its reduced range, oneDNN's 256), so a prefill's
    outputs are within int8 rounding of fbgemm's, and no further from float32's (tests/engine/test_onednn_int8.py).
    """

    def __init__(self, few: nn.Module, many: nn.Module) -> None:
        super().__init__()
        self.few = few
        self.many = many

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        out: torch.Tensor = (self.many if rows >= PREFILL_ROWS else self.few)(x)
        return out


class OnednnInt8Linear(nn.Module):
    """int8 weights per output channel (rows and float64 scales from ``kernels.quantize_rows``) times
    activations quantized per call, multiplied by oneDNN; the weights are packed once into its layout."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.packed = torch.ops.onednn.qlinear_prepack(q, [_PACKED_ROWS, self.in_features])
        self.scales = scales.float()
        self.zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        self.bias = None if bias is None else bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qx, scale, zero_point = quantize_activations(x.float())
        out: torch.Tensor = torch.ops.onednn.qlinear_pointwise(
            qx, scale, zero_point, self.packed, self.scales, self.zero_points, self.bias, 1.0, 0, torch.float32,
            "none", [], "")
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8=onednn"


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """``x`` in 256 levels between its least and greatest value (zero always one of them): the uint8 values,
    the step and the level of zero."""
    low, high = (float(v) for v in torch.aminmax(x))
    low, high = min(low, 0.0), max(high, 0.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        # A NaN or an infinity makes the output meaningless whatever the levels; it must not raise here.
        low, high = -1.0, 1.0
    scale = max((high - low) / 255.0, 1e-12)
    zero_point = min(255, max(0, round(-low / scale)))
    # Adding one half before the conversion, which truncates, rounds to the nearest level.
    q = x.mul(1.0 / scale).add_(zero_point + 0.5).clamp_(0.0, 255.0).to(torch.uint8)
    return q, scale, zero_point
