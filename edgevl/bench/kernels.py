"""The rates the bench's floors and its Kernels table rest on: matrix products, memory reads, attention.

Every product is one projection of the checkpoint's gate and up shape (hidden x intermediate: 2048x6144 in
Qwen3-VL-2B) at one row (a decode step), at 8 (a burst's decode step), at 256 rows (a frame's prompt) and at
1,024 rows (a frame's patches, a page's prompt).  Eight different matrices
take turns, so that a one-row product reads its weights from memory, as a decode step does, where the cache
is smaller than they are.  One 2-core host had a 300 MB last-level cache, which held eight int8 (100 MB) and
int4 (50 MB) matrices alike: there the one-row rates compare the kernels with each other, not with memory,
and a decode step, whose gigabytes no cache holds, is taken at its kernel's one-row read only up to the
memory's (the sum's, or the engine's own decode steps').

int4 is measured twice: the engine's own kernel (``edgevl.engine.int4_kernel``, the decode steps of precision
int4), and torch's CPU kernel for group-wise 4-bit weights (``_weight_int4pack_mm_for_cpu``, bfloat16
activations; its float32 path is some thirty times slower), the one this torch build has and the one Inductor's
and torchao's CPU int4 layouts call, which int4 does not use: it read its weights well below the memory's rate.
The Kernels table sets their one-row rates against fbgemm int8's: weights of half the bytes pay only if their
kernel reads them at something near the memory's bandwidth.  The eight-row rate is a burst's decode step (the
stream mode's frames together), which int4 takes below ``onednn_int8.PREFILL_ROWS`` rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from edgevl.engine import int4_kernel, int4_shape, onednn_int8
from edgevl.engine.float32_packing import PackedLinear
from edgevl.engine.kernels import (
    FbgemmLinear,
    bfloat16_attention_fast,
    fbgemm_int8_available,
    int8_linear,
    quantize_rows,
)
from edgevl.errors import ModelError

MATRICES = 8  # 400 MB in float32, 100 MB in int8, 50 MB in int4 (2048x6144)
IN, OUT = 2048, 6144  # Qwen3-VL-2B's gate and up projections: the shape the bench's own checkpoint has
ROWS = (1, 8, 256, 1024)
INT4_GROUP = 128  # the largest group the int4 goal admits: the least work per weight, int4's best case


def int4_rows(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (out x in, float) as torch's CPU int4 kernel takes it: asymmetric 4-bit per group of
    ``group`` inputs, packed; and the per-group scales and zero points (bfloat16).

    The kernel computes ``x @ ((q - 8) * scale + zero).T``; with ``zero = low + 8 * scale`` that is the
    group's ``q * scale + low``, ``q`` in 0..15.
    """
    out, inputs = weight.shape
    grouped = weight.float().reshape(out, inputs // group, group)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = ((grouped - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(out, inputs)
    zero = low + 8 * scale
    scales_zeros = torch.cat([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros


class TorchInt4Linear:
    """A bias-free Linear on torch's int4 weights (``int4_rows``), as the bench times it."""

    def __init__(self, weight: torch.Tensor, group: int = INT4_GROUP) -> None:
        self.group = group
        self.packed, self.scales_zeros = int4_rows(weight, group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group,
                                                          self.scales_zeros)
        return out


def kernel_rates(threads: int, inputs: int = IN, outputs: int = OUT) -> dict[str, float]:
    """GFLOP/s of each kernel on an ``inputs`` x ``outputs`` projection (the checkpoint's gate and up shape) at each
    of ``ROWS``, and the rates the floors use.  A test checkpoint's small matrices take seconds where the 2B shapes
    take minutes on one thread; the int4 kernels need whole groups of 128 inputs."""
    torch.set_num_threads(threads)
    linears = [torch.nn.Linear(inputs, outputs, bias=False) for _ in range(MATRICES)]
    kernels: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
        "float32": list(linears),
        "packed": [PackedLinear(linear) for linear in linears],
        "int8_int_mm": [int8_linear(linear, fbgemm=False) for linear in linears],
    }
    if int4_shape.fits(outputs, inputs):
        kernels["int4_torch"] = [TorchInt4Linear(linear.weight.detach()) for linear in linears]
        try:
            library = int4_kernel.library()
            kernels["int4"] = [int4_kernel.Int4Linear(
                int4_kernel.quantize_groups(*quantize_rows(linear.weight.detach())), None, library)
                for linear in linears]
        except ModelError:  # no C compiler here: the table says so
            pass
    if fbgemm_int8_available():
        kernels["int8"] = [int8_linear(linear, fbgemm=True) for linear in linears]
    if onednn_int8.available():
        kernels["int8_onednn"] = [onednn_int8.OnednnInt8Linear(*quantize_rows(linear.weight.detach()), None)
                                  for linear in linears]
    rates: dict[str, float] = {"matrix_inputs": inputs, "matrix_outputs": outputs}
    for rows in ROWS:
        x = torch.randn(rows, inputs)
        for name, fns in kernels.items():
            # A few rows read the weights as one does: every matrix in turn, from memory.
            seconds = _seconds_per_call(fns, x, 7) if rows <= 8 else _seconds_per_busy_call(fns[:4], x)
            rates[f"{name}_m{rows}"] = round(2 * rows * inputs * outputs / seconds / 1e9, 1)
    rates["read_gbs"] = read_bandwidth()
    rates["fault_in_gbs"] = fault_in_rate()
    if fbgemm_int8_available():
        rates["fbgemm_pack_mbs"] = packing_rate(inputs, outputs)
    rates["attention_gflops"] = attention_rate()
    if bfloat16_attention_fast():  # the rate an int8 vision tower attends at here
        rates["attention_bf16_gflops"] = attention_rate(torch.bfloat16)
    return rates


def _seconds_per_call(fns: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, rounds: int) -> float:
    """One call of each matrix in turn, ``rounds`` times; the fastest round.  A shared host's other work only
    ever slows a round down: one disturbed run of three rounds put fbgemm's one-row rate at 12 GFLOP/s while
    the engine's own decode steps read through it at 23 GB/s (48 GFLOP/s)."""
    with torch.inference_mode():
        for fn in fns:
            fn(x)
        fastest = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            for fn in fns:
                fn(x)
            fastest = min(fastest, time.perf_counter() - started)
        return fastest / len(fns)


def _seconds_per_busy_call(fns: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
                           least: float = 0.15, rounds: int = 3, most: float = 3.0) -> float:
    """Many rows are bound by arithmetic, not by reading the weights: a few matrices in turn, for ``least``
    seconds at least (a handful of calls of a few milliseconds each varied twofold on a shared host), in
    ``rounds`` rounds; the fastest round's (one disturbed round of 0.3 s put fbgemm's 256-row rate at 83
    GFLOP/s against 700 in the runs before and after).

    A round stops at ``most`` seconds, and a kernel whose first call takes longer is timed by that call alone:
    on a CPU without VNNI ``torch._int_mm`` is a plain loop (2.5 GFLOP/s, 10.7 s a call at 1,024 rows, on a
    2-core AMD EPYC with AVX2), and three rounds of eight such calls held the bench for five minutes."""
    with torch.inference_mode():
        started = time.perf_counter()
        fns[0](x)
        first = time.perf_counter() - started
        if first >= most:
            return first
        fastest = float("inf")
        for _ in range(rounds):
            calls, started = 0, time.perf_counter()
            while (calls < 2 * len(fns) or time.perf_counter() - started < least) \
                    and time.perf_counter() - started < most:
                fns[calls % len(fns)](x)
                calls += 1
            fastest = min(fastest, (time.perf_counter() - started) / calls)
        return fastest


def weight_bytes(kernel: str, inputs: int = IN, outputs: int = OUT) -> float:
    """Bytes of one projection's weights as ``kernel`` reads them (scales included)."""
    if kernel == "int4":  # two weights a byte, a byte's step a group, a float32 scale an output
        return inputs * outputs / 2 + (inputs // INT4_GROUP) * outputs + outputs * 4.0
    if kernel == "int4_torch":  # two weights a byte, a bfloat16 scale and zero point a group
        return inputs * outputs / 2 + (inputs // INT4_GROUP) * outputs * 4.0
    if kernel in ("float32", "packed"):
        return inputs * outputs * 4.0
    return inputs * outputs + outputs * 4.0  # int8: a byte a weight, a float32 scale per output


def matrix_shape(rates: dict[str, float]) -> tuple[int, int]:
    """The inputs and outputs of the projection ``rates`` were measured on."""
    return int(rates.get("matrix_inputs", IN)), int(rates.get("matrix_outputs", OUT))


def read_rate(rates: dict[str, float], kernel: str) -> float:
    """GB/s at which ``kernel`` reads its weights at one row (its one-row GFLOP/s turned into bytes)."""
    inputs, outputs = matrix_shape(rates)
    seconds = 2 * inputs * outputs / (rates[f"{kernel}_m1"] * 1e9)
    return round(weight_bytes(kernel, inputs, outputs) / seconds / 1e9, 1)


def int4_verdict(kernels: dict[str, float]) -> list[str]:
    """What the int4 kernels' measured rates say of int4 decode steps against int8's."""
    int8 = "int8" if "int8_m1" in kernels else "int8_int_mm"
    memory = kernels["read_gbs"]
    int8_read = read_rate(kernels, int8)
    inputs, outputs = matrix_shape(kernels)
    lines = []
    for name, label in (("int4", "the engine's int4 kernel"), ("int4_torch", "torch's int4 kernel")):
        if f"{name}_m1" not in kernels:
            why = "no C compiler" if int4_shape.fits(outputs, inputs) else \
                f"a {inputs}x{outputs} matrix has no whole groups of {INT4_GROUP}"
            lines.append(f"{label[0].upper()}{label[1:]} was not measured here ({why}).")
            continue
        read = read_rate(kernels, name)
        # A decode step reads each kernel's weights at its one-row read, and no faster than the memory.
        step = (weight_bytes(name, inputs, outputs) / min(read, memory)) / \
            (weight_bytes(int8, inputs, outputs) / min(int8_read, memory))
        lines.append(
            f"{label[0].upper()}{label[1:]} (`{name}`) against int8 (`{int8}`), same run:"
            f" {kernels[f'{name}_m1'] / kernels[f'{int8}_m1']:.2f}x the one-row rate,"
            f" {kernels[f'{name}_m8'] / kernels[f'{int8}_m8']:.2f}x the eight-row rate; it reads its weights at {read}"
            f" GB/s at one row (int8 at {int8_read}, the memory {memory} by a sum), so a decode step's products on it"
            f" take {step:.2f}x int8's time (worth having at 1/1.6 = 0.62x or less).")
    return lines


def attention_rate(dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of attention (SDPA) in ``dtype`` over 2,048 tokens of 16 heads of 64: a vision tower's layer."""
    q, k, v = (torch.randn(1, 16, 2048, 64, dtype=dtype) for _ in range(3))
    with torch.inference_mode():
        F.scaled_dot_product_attention(q, k, v)
        t = time.perf_counter()
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v)
        seconds = (time.perf_counter() - t) / 3
    return round(4 * 2048**2 * 64 * 16 / seconds / 1e9, 1)


def read_bandwidth() -> float:
    """GB/s at which these threads read memory: a sum over 1 GiB, the best of three."""
    data = torch.ones(1 << 28)  # written once: resident, not just reserved
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - t)
    return round(data.numel() * 4 / best / 1e9, 1)


def _one_thread(measure: Callable[[], float]) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure()
    finally:
        torch.set_num_threads(threads)


def fault_in_rate() -> float:
    """GB/s at which one thread makes fresh memory resident (256 MiB, written once), the best of three: what a
    start pays for the weights it makes in memory of its own (float32's converted or reordered weights) beside
    reading them.  Each round's memory is the system's afresh: glibc maps an allocation this large on its own
    and unmaps it when freed."""
    def measure() -> float:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            torch.empty(1 << 26).fill_(1.0)
            best = min(best, time.perf_counter() - started)
        return round((1 << 28) / best / 1e9, 2)
    return _one_thread(measure)


def packing_rate(inputs: int = IN, outputs: int = OUT) -> float:
    """MB/s of int8 rows (one matrix of ``outputs`` rows) one thread packs into fbgemm's layout, the best of three:
    the work of an int8 start that packs its layers as it maps them (``edgevl.engine.loading``)."""
    q, scales = quantize_rows(torch.randn(outputs, inputs))

    def measure() -> float:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            FbgemmLinear(q, scales, None)
            best = min(best, time.perf_counter() - started)
        return round(q.numel() / best / 1e6, 1)
    return _one_thread(measure)
