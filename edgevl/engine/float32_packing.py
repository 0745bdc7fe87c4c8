"""float32 Linear layers on oneDNN-packed weights, where a trial at load shows that this CPU runs them faster.

Which of oneDNN's packed kernel and torch's BLAS (``F.linear``) multiplies float32 faster is not a matter of the
CPU's vendor and instruction sets: 2-core hosts of one name disagreed (``edgevl bench``, Kernels table, 2048x6144).
On AMD EPYCs with AVX-512 the packed kernel was far faster; on Intel Xeons with AVX-512 as fast at one row and up
to 20% faster at 256; on one AVX2 EPYC ``F.linear`` was faster at both, on another the packed kernel 1.1x as fast at
one row, 2x at four to 32 rows (the stream mode's decode steps) and 1.07x at 256.  Reordering the weights costs a
float32 start one to three seconds on 2 cores, so a worker decides by timing both kernels on matrices of its model's
own shape before it loads (``trial``, under a second), and packs only where that pays.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edgevl import cpuinfo

log = logging.getLogger(__name__)

# A decode step of one frame, of eight frames together (the stream mode), and a prefill.
STREAM_ROWS = 8
TRIAL_ROWS = (1, STREAM_ROWS, 256)
# Packing pays where it multiplies this much faster over the trial's row counts (their times' geometric mean).
PAYS_AT = 1.1
# Matrices timed at most: their bytes should exceed the cache, as the model's do.
_MOST_MATRICES = 8
# The last-level cache assumed where the kernel does not tell its size: a 2-core host's share of a server CPU's.
_CACHE_UNKNOWN = 32 << 20


class PackedLinear(nn.Module):
    """A float32 Linear whose weight is kept in oneDNN's blocked layout.

    Same arithmetic as ``nn.Linear`` (float32 products and sums), faster
    kernels; the weight is reordered once at load time and the dense copy freed.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().float()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn_packed=True"


def packing_available() -> bool:
    available = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    return available and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@dataclass(frozen=True)
class Trial:
    """Seconds of one product of each kernel at each of ``TRIAL_ROWS``, the median over the trial's matrices."""

    shape: tuple[int, int]  # (outputs, inputs) of the matrices timed
    matrices: int
    dense: tuple[float, ...]  # F.linear
    packed: tuple[float, ...]  # oneDNN's packed kernel
    transposed: float  # the product as the weights times the rows' transpose, at STREAM_ROWS

    @property
    def speedup(self) -> float:
        """How much faster the packed kernel is: the geometric mean of the time ratios over the row counts."""
        ratios = [d / p for d, p in zip(self.dense, self.packed, strict=True)]
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios))

    @property
    def pays(self) -> bool:
        return self.speedup >= PAYS_AT

    @property
    def transposed_pays(self) -> bool:
        """Whether the unpacked output head multiplies a few rows faster as its weights times their transpose."""
        return self.dense[TRIAL_ROWS.index(STREAM_ROWS)] / self.transposed >= PAYS_AT

    def describe(self) -> str:
        rows = ", ".join(f"{r} row{'s' if r > 1 else ''} {d * 1e3:.2f} against {p * 1e3:.2f} ms"
                         for r, d, p in zip(TRIAL_ROWS, self.dense, self.packed, strict=True))
        return (f"F.linear against oneDNN packed, {self.matrices} of {self.shape[0]}x{self.shape[1]}: {rows}; "
                f"{STREAM_ROWS} rows transposed {self.transposed * 1e3:.2f} ms")


def _median_seconds(run: Callable[[int], object], count: int, repeats: int) -> float:
    run(0)  # the kernel's first call makes its primitive for this shape
    times = []
    for _ in range(repeats):
        for index in range(count):
            started = time.perf_counter()
            run(index)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def trial_matrices(shape: tuple[int, int], available: int, cache_bytes: int | None) -> int:
    """How many matrices of ``shape`` the trial times: enough to fill twice the last-level cache (as a model's
    weights do), at least two, at most the model's own ``available`` and ``_MOST_MATRICES``."""
    each = shape[0] * shape[1] * 4
    wanted = math.ceil(2 * (cache_bytes or _CACHE_UNKNOWN) / each)
    return max(1, min(available, _MOST_MATRICES, max(2, wanted)))


def trial(shape: tuple[int, int], matrices: int) -> Trial:
    """Time ``F.linear`` and oneDNN's packed kernel on ``matrices`` float32 matrices of ``shape``."""
    weights = [torch.full(shape, 0.01).add_(torch.rand(shape[1]) * 0.01) for _ in range(matrices)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    dense_s, packed_s = [], []
    for rows in TRIAL_ROWS:
        x = torch.randn(rows, shape[1])

        def dense(index: int, x: torch.Tensor = x) -> object:
            return F.linear(x, weights[index])

        def onednn(index: int, x: torch.Tensor = x) -> object:
            return torch.ops.mkldnn._linear_pointwise(x, packed[index], None, "none", [], "")

        repeats = 1 if rows > 64 else 3  # a one-row product is a few milliseconds of reading
        with torch.inference_mode():
            dense_s.append(_median_seconds(dense, matrices, repeats))
            packed_s.append(_median_seconds(onednn, matrices, repeats))
    x = torch.randn(STREAM_ROWS, shape[1])

    def transposed(index: int) -> object:
        return torch.mm(weights[index], x.t())

    with torch.inference_mode():
        transposed_s = _median_seconds(transposed, matrices, 3)
    return Trial(shape, matrices, tuple(dense_s), tuple(packed_s), transposed_s)


@functools.cache
def decide(shape: tuple[int, int], available: int) -> Trial | None:
    """The trial for a model whose largest float32 matrices have ``shape`` (``available`` of them), once per
    process; None where oneDNN's packing is missing or the model's matrices all fit in the last-level cache,
    where they stay ``nn.Linear`` without a trial (a test model: nothing to gain, and the same kernels at every
    start), and where the trial fails."""
    if not packing_available():
        return None
    cache_bytes = cpuinfo.last_level_cache_bytes()
    if shape[0] * shape[1] * 4 * available <= (cache_bytes or _CACHE_UNKNOWN):
        return None
    try:
        result = trial(shape, trial_matrices(shape, available, cache_bytes))
    except (RuntimeError, MemoryError) as exc:  # a trial that cannot run never stops a load: F.linear serves
        log.warning("float32 stays on F.linear: timing oneDNN's packed kernel failed (%s)", exc)
        return None
    log.info("float32 %s, its output head multiplies several rows %s: %s (%.2fx)",
             "packs its weights for oneDNN" if result.pays else "stays on F.linear",
             "transposed" if result.transposed_pays else "by F.linear", result.describe(), result.speedup)
    return result


def trial_for(config: Any) -> Trial | None:
    """This process's trial (``decide``) for a Qwen3-VL of ``config``: on its language model's MLP matrices."""
    text = getattr(config, "text_config", config)
    shape = (int(text.intermediate_size), int(text.hidden_size))
    return decide(shape, 3 * int(text.num_hidden_layers))  # gate, up and down in each layer


def packing_pays(config: Any) -> bool:
    """Whether a float32 Qwen3-VL of ``config`` runs on oneDNN-packed weights."""
    found = trial_for(config)
    return found is not None and found.pays


def head_transposed(config: Any) -> bool:
    """Whether a float32 Qwen3-VL of ``config`` multiplies several rows by its tied output head transposed
    (``edgevl.engine.kernels.ChunkedLinear``)."""
    found = trial_for(config)
    return found is not None and found.transposed_pays


@dataclass
class Unpacked:
    """A float32 Linear answering with ``F.linear`` on weights mapped from a prepared file until the packer
    (``edgevl.engine.packing``) swaps in its oneDNN-packed copy; the mapping goes with this module."""

    path: str
    linear: nn.Linear

    def packed(self, prefill_copy: bool) -> nn.Module:
        return PackedLinear(self.linear)
