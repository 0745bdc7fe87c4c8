"""Matrix-product kernels for the CPU: fbgemm int8 Linear layers, the float32 output head in slices, and the
choice of kernel for each precision's Linear layers.

float32 runs on oneDNN-packed weights where a trial at load chooses them (``edgevl.engine.float32_packing``),
otherwise on ``F.linear``.  fbgemm's dynamically quantized Linear (int8 weights per output
channel, activations quantized per call) is the fast int8 kernel (``edgevl bench`` writes the
Kernels table of docs/performance.md); the engine calls its
operators itself (``FbgemmLinear``), not through ``torch.ao``'s module, which torch has
announced it will move out.  Where the operators are gone, int8
falls back to ``torch._int_mm`` on the same int8 weights with activations quantized
per row, as fbgemm quantizes them per call: the answers agree within rounding, and
the bench's Kernels table measures both (``torch._weight_int8pack_mm``, weights only,
was far slower than either here), so an appliance keeps working across a torch upgrade.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edgevl.engine.float32_packing import PackedLinear

# Rows quantized at a time, so that a 151936 x 2048 output head never exists in
# float32 in memory (1.2 GB) while it is converted.
_CHUNK_ROWS = 8192


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (output channel), in row chunks: the int8 rows and their float64 scales.

    Plain arithmetic (round half to even, as ``torch.quantize_per_channel`` does), so that no quantized
    tensor type is needed to make the weights.
    """
    rows = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float64)
    for start in range(0, rows, _CHUNK_ROWS):
        # A copy of its own, worked on in place: loading quantizes some 300 matrices, and every temporary
        # of this size costs the worker's start time.
        block = weight[start : start + _CHUNK_ROWS].to(torch.float32, copy=True)
        low, high = torch.aminmax(block, dim=1)
        scale = (torch.maximum(high, low.neg()) / 127.0).clamp(min=1e-8).double()
        # Times the float32 inverse of the scale, as quantize_per_channel computes it: the same int8 values.
        inverse = (1.0 / scale.float()).unsqueeze(1)
        q[start : start + _CHUNK_ROWS] = block.mul_(inverse).round_().clamp_(-128, 127)
        scales[start : start + _CHUNK_ROWS] = scale
    return q, scales


def _per_channel_qint8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch._make_per_channel_quantized_tensor(q, scales, torch.zeros(q.shape[0], dtype=torch.int64), 0)


def fbgemm_int8_available() -> bool:
    """Whether this torch still has fbgemm's dynamic int8 Linear: its operators (``FbgemmLinear``) and the
    quantized weight tensor they pack, whose creation torch has announced it will remove as well."""
    ops = torch.ops.quantized
    return (hasattr(ops, "linear_prepack") and hasattr(ops, "linear_dynamic")
            and hasattr(torch, "_make_per_channel_quantized_tensor")
            and "fbgemm" in torch.backends.quantized.supported_engines)


def int8_dot_products() -> bool:
    """Whether this CPU multiplies int8 with VNNI or AMX: int8 products summed in 32 bits by one instruction.
    With AVX2 alone they go through 16-bit pair sums, which kernels either avoid (fbgemm narrows its activations
    to 7 bits) or pay for in speed (``int_mm_fast``) or in range: oneDNN's u8 x s8 product saturates there (on a
    2-core AMD EPYC with AVX2 a 256-wide product came out 7.6% from float32's, where fbgemm stays within 2%),
    which the engine never meets, for it uses that kernel only with AMX (``edgevl.engine.onednn_int8.pays``)."""
    return cpu_has("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_capabilities() -> dict[str, Any] | None:
    """torch's report of this CPU's instruction sets (``torch.cpu.get_capabilities``), or None where this torch
    cannot tell."""
    try:
        return dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):
        return None


def cpu_has(*flags: str) -> bool:
    """Whether this CPU has any of ``flags`` (``torch.cpu.get_capabilities`` keys); False where torch cannot tell."""
    capabilities = cpu_capabilities() or {}
    return any(bool(capabilities.get(flag)) for flag in flags)


def int_mm_fast() -> bool:
    """Whether ``torch._int_mm`` has a fast kernel on this CPU.

    Its int8 products need VNNI or AMX: on an AVX2-only host they ran at 3.1 GFLOP/s for one row and 3.6 at
    256 rows, against fbgemm's 29 and 211 (fbgemm has AVX2 int8 kernels of its own); on an AVX-512 VNNI host
    at 0.8x and 0.9x fbgemm's rates (``edgevl bench``, Kernels table).
    """
    return int8_dot_products()


class IntMatmulLinear(nn.Module):
    """int8 weights per output channel times activations quantized per row at each call, multiplied by
    ``torch._int_mm`` (int8 x int8 to int32): the int8 kernel where fbgemm's dynamic Linear is gone.

    The weights stay as they are made, one output channel per row: ``_int_mm`` reads them through a
    transposed view no slower than from a transposed copy (measured on the 2-core host), so rows mapped
    from a prepared file (``edgevl.engine.prepared``) are used in place, never copied.
    """

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.float())
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        step = (flat.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        xq = torch.round(flat * (1.0 / step)).clamp(-128, 127).to(torch.int8)
        out = torch._int_mm(xq, self.qweight.t()).float() * step * self.scales
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8=True"


def int8_linear(linear: nn.Linear, rows: tuple[torch.Tensor, torch.Tensor] | None = None,
                fbgemm: bool | None = None) -> nn.Module:
    """An int8 replacement for ``linear`` (the float weight can be freed afterwards): fbgemm's dynamic
    Linear where this torch has it (``fbgemm=None``), else ``torch._int_mm``.

    ``rows``: the weight already quantized by ``quantize_rows``.
    """
    bias = linear.bias.detach().float() if linear.bias is not None else None
    q, scales = rows if rows is not None else quantize_rows(linear.weight.detach())
    return int8_kernel(q, scales, bias, fbgemm)


def int8_kernel(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                fbgemm: bool | None = None) -> nn.Module:
    """The int8 module for rows made by ``quantize_rows``: fbgemm's where this torch has it (``fbgemm=None``),
    else ``torch._int_mm``."""
    if not (fbgemm_int8_available() if fbgemm is None else fbgemm):
        return IntMatmulLinear(q, scales, bias)
    return fbgemm_linear(q, scales, bias)


def fbgemm_linear(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """fbgemm's dynamic int8 Linear on int8 rows and their float64 scales (``quantize_rows``).

    Packing copies the rows into fbgemm's own layout: ``q`` is not referenced afterwards.  A matrix of more
    than ``RowSlices.ROWS`` outputs (the output head) is packed in slices, so that the quantized copy packing
    makes on the way (0.3 GB for the whole head) never exists at once.
    """
    if q.shape[0] > RowSlices.ROWS:
        step = RowSlices.ROWS
        return RowSlices([FbgemmLinear(q[start: start + step], scales[start: start + step],
                                       None if bias is None else bias[start: start + step])
                          for start in range(0, q.shape[0], step)])
    return FbgemmLinear(q, scales, bias)


class RowSlices(nn.Module):
    """One Linear made of slices of its outputs, each its own fbgemm Linear.

    fbgemm quantizes the activations once per call from the whole input, which every slice sees whole, and
    each output channel has its own weight scale: the outputs are those of the unsliced Linear
    (tests/engine/test_kernels.py).
    """

    ROWS = 16384

    def __init__(self, slices: list[nn.Module]) -> None:
        super().__init__()
        self.slices = nn.ModuleList(slices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.slices], dim=-1)


@functools.cache
def _linear_dynamic() -> Callable[..., torch.Tensor]:
    # The operator itself rather than its packet: the packet checks each call's arguments in Python for the
    # stand-ins of a trace, which costs a decode step more than a millisecond over its ~120 int8 calls.
    overload = torch.ops.quantized.linear_dynamic.default
    op: Callable[..., torch.Tensor] = getattr(overload, "_op", overload)
    return op


class FbgemmLinear(nn.Module):
    """fbgemm's dynamic int8 Linear: ``quantized::linear_dynamic`` over the weights ``quantized::linear_prepack``
    packed, with the reduced activation range, as torch.ao's dynamic Linear calls them, called straight.

    A decode step of one row makes about 120 of these calls, most a few hundred microseconds of reading weights;
    torch.ao's module added its Python (its forward, its packed-parameter module, the operator packet's check)
    to every one.  Same operators, same arguments: the outputs are that module's bit for bit
    (tests/engine/test_kernels.py).
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.packed = torch.ops.quantized.linear_prepack(_per_channel_qint8(q, scales), bias)
        self.op = _linear_dynamic()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.packed, True)  # reduce_range: fbgemm's 7-bit activations (int8_dot_products)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fbgemm=True"


class ChunkedLinear(nn.Module):
    """A very wide float32 Linear (the output head tied to the embedding: 151,936 outputs) computed 4,096
    outputs at a time.

    For a few rows (a decode step's), one product over all outputs reads the 1.2 GB matrix at well under the
    memory's bandwidth on some hosts; in slices it ran about twice as fast at eight rows there, with the same
    products and sums per output (bit for bit; tests/engine/test_kernels.py).  Where the float32 trial at load
    (``edgevl.engine.float32_packing``) finds it faster, each slice multiplies as its weights times the rows'
    transpose: on a 2-core AVX2 EPYC eight rows took 134-150 ms so against 242 ms (the same products, summed in
    another order: equal to the last bits).  A single row is one product:
    the BLAS's matrix-vector kernel may split a row's sum differently for a slice than for the whole matrix
    (a last-bit difference, seen on an Intel host), and it reads at the bandwidth anyway.  The weight stays
    the embedding's own tensor: packing a copy would cost 1.2 GB.
    """

    CHUNK = 4096

    def __init__(self, linear: nn.Linear, transposed: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight  # shared, not copied
        self.bias = linear.bias
        self.transposed = transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features:
            return F.linear(x, self.weight, self.bias)
        if self.transposed:
            return self._transposed(x)
        parts = []
        for start in range(0, self.out_features, self.CHUNK):
            bias = None if self.bias is None else self.bias[start: start + self.CHUNK]
            parts.append(F.linear(x, self.weight[start: start + self.CHUNK], bias))
        return torch.cat(parts, dim=-1)

    def _transposed(self, x: torch.Tensor) -> torch.Tensor:
        columns = x.reshape(-1, self.in_features).t()
        parts = [torch.mm(self.weight[start: start + self.CHUNK], columns).t()
                 for start in range(0, self.out_features, self.CHUNK)]
        out = torch.cat(parts, dim=-1)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, chunk={self.CHUNK}, "
                f"transposed={self.transposed}")


def bfloat16_attention_fast() -> bool:
    """Whether attention in bfloat16 beats float32 on this CPU: where it has AMX's bfloat16 tiles.

    Measured (SDPA, 16 heads of 64, as in a vision layer, 2 cores): on an Intel Xeon with AMX, 3,952 tokens (an A4
    page's patches) 313 ms in float32 against 120 ms in bfloat16; 720 tokens (a W4 frame's) 11.8 against 5.0 ms.
    On an AMD EPYC (Zen 4) with AVX-512 BF16 but no AMX, the same: 441-444 ms against 415-450 ms, and the int8
    2B tower took as long either way (a page 17.3-19.4 s in float32, 17.9-18.1 s in bfloat16), so there it would
    round for nothing.  (oneDNN held to AVX-512 BF16 on the AMX host ran 2x float32, but no CPU without AMX
    has shown that.)
    """
    return cpu_has("amx_bf16")


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 rows with one scale per row, looked up in float32.

    With a tied output head these are the very int8 values the head multiplies
    with (fbgemm keeps its own packed copy), so the 2B model's 151936x2048 table
    costs 0.3 GB instead of 1.2 GB in float32; a lookup only scales a few rows.
    """

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.float().unsqueeze(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.qweight).float()
        return rows * nn.functional.embedding(ids, self.scales)


def _converter(precision: str, packs: bool) -> Callable[[nn.Linear], nn.Module] | None:
    """int8 uses fbgemm, float32 oneDNN-packed weights where its trial chose them (``packs``,
    ``edgevl.engine.float32_packing``); otherwise ``nn.Linear`` stays."""
    if precision == "int8":
        return int8_linear
    if precision == "float32" and packs:
        return PackedLinear
    return None


def _loaded(linear: nn.Linear) -> bool:
    return not linear.weight.is_meta and (linear.bias is None or not linear.bias.is_meta)


def convert_linear(model: nn.Module, name: str, precision: str, packs: bool = False) -> None:
    """Replace the module ``name`` of ``model``, if it is a loaded ``nn.Linear``, by the fast kernel of
    ``precision`` (float32: packed for oneDNN if ``packs``)."""
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent)
    child = getattr(owner, attr, None)
    convert = _converter(precision, packs)
    if convert is not None and isinstance(child, nn.Linear) and _loaded(child):
        setattr(owner, attr, convert(child))


def convert_linears(module: nn.Module, precision: str, packs: bool = False) -> int:
    """Replace every loaded ``nn.Linear`` below ``module`` by the fast kernel of ``precision`` (float32: packed
    for oneDNN if ``packs``); returns the count."""
    convert = _converter(precision, packs)
    if convert is None:
        return 0
    if isinstance(module, nn.Linear):
        raise TypeError("convert the parent of a Linear layer")
    count = 0
    for name, child in list(module.named_children()):
        if not isinstance(child, nn.Linear):
            count += convert_linears(child, precision, packs)
        elif _loaded(child):
            setattr(module, name, convert(child))
            count += 1
    return count
