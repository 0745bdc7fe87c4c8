"""int4 weights for the language model's decoder layers: group-wise four-bit rows and the C kernel that multiplies
them (``int4.c`` beside this file).

A one-row decode step is bound by reading the weights, so half of int8's bytes is the one lever left on it.
torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``, which torchao's CPU layouts also call) unpacks to
floating point and read its weights at 12.6 GB/s where fbgemm int8 read at 20 (``edgevl bench``, Kernels table),
and reached 168 GFLOP/s at 256 rows against fbgemm's 694.  ``int4.c`` multiplies the four-bit levels as bytes with
the CPU's int8 dot products, sixteen outputs side by side as fbgemm lays out its own int8 weights, so it reads
one row at the memory's rate and multiplies many at close to fbgemm's (``edgevl bench``'s Kernels table on a
2-core Xeon with AMX, 2048x6144: 118 GFLOP/s at one row against fbgemm's 46, 548 at 256 rows against 635).  So
the decoder layers need no int8 copy beside their groups, save oneDNN's where the CPU has AMX (995 GFLOP/s at
256 rows there) and the memory cap leaves room for it (``onednn_int8.packed``).

The C file is compiled once with the system's C compiler into a shared library kept under the state directory
(``library``), named by a hash of its source, its flags and the compiler's version, so an edited file or another
compiler never meets an old build; it uses torch's own OpenMP runtime (torch has loaded it by then), so its
threads are torch's.  It picks AVX-512 VNNI, AVX2 or plain C at run time, all with the same bits out.

Each output keeps the scale of its int8 row (``kernels.quantize_rows``); each group of 128 inputs in it has a whole
step (-16..16) and sixteen levels (-8..7 steps), so that every weight is an int8 value of the row's grid.  The
groups are made from the int8 rows a load makes or maps anyway, so a prepared file's rows give the same int4 values
as the checkpoint's; a changed layout needs ``edgevl.engine.prepared.FORMAT`` raised.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from edgevl.engine.compiler import c_compiler
from edgevl.engine.int4_shape import GROUP as GROUP  # the kernel's shape rule
from edgevl.engine.int4_shape import LANES as LANES
from edgevl.engine.int4_shape import fits as fits
from edgevl.errors import ModelError

log = logging.getLogger(__name__)

_CHUNK_ROWS = 4096  # rows quantized at a time (a multiple of LANES): the copies of a chunk stay small
# The int4 products, and the attention of a decode step over the bfloat16 cache (edgevl.engine.row_attention).
_SOURCES = tuple(Path(__file__).with_name(name) for name in ("int4.c", "attend.c"))
_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp")
LEVELS = {2: "AVX-512 VNNI", 1: "AVX2", 0: "plain C"}


class Int4Rows(NamedTuple):
    """A matrix in four-bit groups on its int8 grid, in ``int4.c``'s layout: the packed levels (out/16 x in*8,
    uint8: for each block of 16 outputs, group after group, 16 chunks of 64 bytes, byte 4*o + t of chunk c
    holding q + 8 of output o at input 4c + t of the group in its low four bits and at input 64 + 4c + t in its
    high four), each group's whole step (out/16 x groups*16, int8, -16..16 but never 0) and each output's float
    scale (out, float32: the int8 rows')."""

    packed: torch.Tensor
    steps: torch.Tensor
    scales: torch.Tensor


# (block, output, group, half, chunk, input of the chunk) <-> (block, group, chunk, output, input, half)
_TO_LAYOUT = (0, 2, 4, 1, 5, 3)
_FROM_LAYOUT = (0, 3, 1, 5, 2, 4)


def quantize_groups(q: torch.Tensor, scales: torch.Tensor) -> Int4Rows:
    """int8 rows and their scales (``kernels.quantize_rows``) in four-bit groups on the same grid: each group's
    step the least whole number that holds its value of largest magnitude within -8 steps, each value the nearest
    level (held at +7 beyond it, and at -7 where the step is -16, as -8 steps would be +128, off the grid).  A
    group whose values are within -7..7 keeps them exactly."""
    rows, columns = q.shape
    if not fits(rows, columns):
        raise ValueError(f"a {rows}x{columns} matrix has no whole int4 groups")
    groups = columns // GROUP
    packed = torch.empty(rows // LANES, columns * 8, dtype=torch.uint8)
    steps = torch.empty(rows // LANES, groups * LANES, dtype=torch.int8)
    for start in range(0, rows, _CHUNK_ROWS):
        end = min(rows, start + _CHUNK_ROWS)
        values = q[start:end].to(torch.int16).view(end - start, groups, GROUP)
        largest = values.gather(2, values.abs().argmax(dim=2, keepdim=True)).squeeze(2)
        # |step| = ceil(|largest| / 8), of the opposite sign; 1 for a group of zeros.
        step = torch.where(largest > 0, -((largest + 7) // 8), (7 - largest) // 8).clamp_(-16, 16)
        step[step == 0] = 1
        lowest = torch.where(step == -16, -7.0, -8.0).unsqueeze(2)
        levels = torch.round(values.float() / step.unsqueeze(2).float()).clamp_(max=7).maximum(lowest)
        nibbles = (levels + 8).to(torch.uint8).view(-1, LANES, groups, 2, 16, 4).permute(_TO_LAYOUT)
        packed[start // LANES: end // LANES] = (nibbles[..., 0] | (nibbles[..., 1] << 4)).reshape(-1, columns * 8)
        steps[start // LANES: end // LANES] = step.to(torch.int8).view(-1, LANES, groups).transpose(1, 2).reshape(
            -1, groups * LANES)
    return Int4Rows(packed, steps, scales.float().contiguous())


def dequantized_grid(rows: Int4Rows) -> torch.Tensor:
    """The int8 values q * step that ``rows`` stand for, output by output (out x in, int32)."""
    blocks, size = rows.packed.shape
    columns, groups = size // 8, size // 8 // GROUP
    chunks = rows.packed.view(blocks, groups, 16, LANES, 4)
    nibbles = torch.stack((chunks & 0x0F, chunks >> 4), dim=-1).permute(_FROM_LAYOUT).reshape(blocks * LANES, columns)
    steps = rows.steps.view(blocks, groups, LANES).transpose(1, 2).reshape(blocks * LANES, groups)
    levels = nibbles.to(torch.int32).view(blocks * LANES, groups, GROUP) - 8
    return (levels * steps.to(torch.int32).unsqueeze(2)).view(blocks * LANES, columns)


def dequantized(rows: Int4Rows) -> torch.Tensor:
    """The float32 weight that ``rows`` stand for (tests, and the bench's agreement)."""
    return dequantized_grid(rows).float() * rows.scales.unsqueeze(1)


def _version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.splitlines()[0] if done.stdout else ""


def _default_directory() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "edgevl" / "kernels"


def build(directory: Path) -> Path:
    """The compiled kernel in ``directory``, compiled there first if it is not yet (a ModelError if it cannot be)."""
    compiler = c_compiler()
    if compiler is None:
        raise ModelError("precision int4 needs a C compiler (cc) to build its kernel; install gcc",
                         "model_unsupported")
    source = b"".join(path.read_bytes() for path in _SOURCES)
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _version(compiler).encode()).hexdigest()[:16]
    target = directory / f"int4-{key}.so"
    if target.is_file():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Compiled under a name of its own and renamed: a worker and its standby may build at once.
        fd, partial = tempfile.mkstemp(dir=directory, prefix=".int4-", suffix=".so")
        os.close(fd)
        try:
            done = subprocess.run([compiler, *_FLAGS, *map(str, _SOURCES), "-o", partial], capture_output=True,
                                  text=True, timeout=300, check=False)
            if done.returncode != 0:
                raise ModelError(f"building the int4 kernel failed: {done.stderr.strip()[-500:]}", "model_unsupported")
            os.replace(partial, target)
        finally:
            with_partial = Path(partial)
            if with_partial.exists():
                with_partial.unlink()
    except (OSError, subprocess.SubprocessError) as exc:  # no room, no permission, a compiler that hangs
        raise ModelError(f"cannot build the int4 kernel in {directory}: {exc}", "model_unsupported") from exc
    log.info("built the int4 kernel %s", target)
    return target


def _loaded(directory: Path) -> ctypes.CDLL:
    """The built library, loaded; one that will not load (damaged, or built elsewhere) is built again, once."""
    target = build(directory)
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        log.warning("the int4 kernel %s does not load (%s): it is built again", target, exc)
        target.unlink(missing_ok=True)
    try:
        return ctypes.CDLL(str(build(directory)))
    except OSError as exc:
        raise ModelError(f"the int4 kernel built in {directory} does not load: {exc}", "model_unsupported") from exc


@functools.cache
def library(directory: Path | None = None) -> ctypes.CDLL:
    """The kernel's library, built in ``directory`` (default: the user's cache) where it is not yet."""
    # torch, imported by this module, has loaded its OpenMP runtime: the library's threads are torch's.
    lib = _loaded(directory or _default_directory())
    lib.edgevl_int4_linear.restype = ctypes.c_int
    lib.edgevl_int4_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    lib.edgevl_int4_level.restype = ctypes.c_int
    lib.edgevl_int4_level.argtypes = [ctypes.c_int]
    lib.edgevl_attend_rows.restype = ctypes.c_int
    lib.edgevl_attend_rows.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2
                                       + [ctypes.c_int64] * 4 + [ctypes.c_float] + [ctypes.c_int] * 2)
    lib.edgevl_int4_level(2)  # the CPU's instruction sets read once, here, before any two threads can ask
    return lib


def level(lib: ctypes.CDLL, limit: int = 2) -> int:
    """The instruction set the kernel uses here, up to ``limit`` (``LEVELS``)."""
    return int(lib.edgevl_int4_level(limit))


class Int4Linear(nn.Module):
    """A Linear on four-bit groups (``quantize_groups``), multiplied by ``int4.c``; the activations are quantized
    per row, symmetric in int8, by the kernel itself.  ``limit`` caps the instruction set (tests compare them)."""

    def __init__(self, rows: Int4Rows, bias: torch.Tensor | None, lib: ctypes.CDLL, limit: int = 2) -> None:
        super().__init__()
        blocks, size = rows.packed.shape
        self.out_features, self.in_features = blocks * LANES, size // 8
        groups = self.in_features // GROUP
        if not fits(self.out_features, self.in_features) or rows.steps.shape != (blocks, groups * LANES) or \
                rows.scales.shape != (self.out_features,):
            raise ValueError("int4 levels, steps and scales of other shapes")
        # Kept as they come (a prepared file's mapping included): the kernel reads them in place.
        self.rows = Int4Rows(*(t.contiguous() for t in rows))
        self.bias = bias
        self.limit = limit
        self._call = lib.edgevl_int4_linear
        self._pointers = tuple(t.data_ptr() for t in self.rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        count = flat.shape[0]
        out = torch.empty(count, self.out_features, dtype=torch.float32)
        if count:
            failed = self._call(*self._pointers, flat.data_ptr(), out.data_ptr(), count, self.out_features,
                                self.in_features, torch.get_num_threads(), self.limit)
            if failed:
                raise MemoryError("the int4 kernel could not allocate its activations")
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4=groups of {GROUP}"
