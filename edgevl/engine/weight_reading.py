"""Reading a checkpoint's tensors from an open safetensors file into the precision a load wants, or a float32
load's from its prepared file.

Without a full-size temporary: a large tensor is converted in row chunks, and a float32 weight that oneDNN
reorders at once goes through a scratch buffer of its loading thread (``edgevl.engine.loading``).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
from torch import nn

from edgevl.engine.float32_packing import Unpacked
from edgevl.engine.prepared import PreparedReader

# Tensors larger than this are read in row chunks, so that the file's dtype and
# the target dtype never both hold the whole tensor (the 2B embedding is 1.2 GB
# in float32).
_CHUNK_BYTES = 64 << 20
# Pieces a weight is read in when it goes straight into a float32 scratch buffer: smaller than the mmap
# threshold set while loading (``loading._LOAD_MMAP_THRESHOLD``), so each piece reuses the heap's warm memory.
_PIECE_BYTES = 512 << 10


def read_converted(f: Any, key: str, dtype: torch.dtype) -> torch.Tensor:
    """A tensor from an open safetensors file, converted to ``dtype``, without a full-size temporary."""
    piece = f.get_slice(key)
    shape = piece.get_shape()
    numel = math.prod(shape)
    if not shape or numel * 4 <= _CHUNK_BYTES:
        return f.get_tensor(key).to(dtype, copy=True)  # type: ignore[no-any-return]
    out = torch.empty(shape, dtype=dtype)
    step = max(1, shape[0] * _CHUNK_BYTES // (numel * 4))
    for start in range(0, shape[0], step):
        out[start : start + step] = piece[start : start + step].to(dtype)
    return out


class Scratch(threading.local):
    """One float32 buffer per loading thread, for weights that oneDNN reorders as soon as they are read.

    Fresh memory is faulted in page by page, and while loading every large allocation is fresh (see
    ``_LOAD_MMAP_THRESHOLD``): converting each weight into memory of its own and then reordering it into more
    faulted in 17.6 GB for the 2B model, at about 1 GB/s on a 2-core virtual machine.  A weight read into the
    thread's buffer, in pieces small enough for the heap's warm memory, is faulted in once, by the reorder.
    """

    buffer: torch.Tensor | None = None

    def read(self, f: Any, key: str) -> torch.Tensor:
        piece = f.get_slice(key)
        shape = piece.get_shape()
        numel = math.prod(shape)
        if self.buffer is None or self.buffer.numel() < numel:
            self.buffer = None
            self.buffer = torch.empty(numel, dtype=torch.float32)
        out = self.buffer[:numel].view(shape)
        row_bytes = max(1, numel // shape[0]) * 4
        step = max(1, _PIECE_BYTES // row_bytes)
        for start in range(0, shape[0], step):
            out[start: start + step].copy_(piece[start: start + step])
        return out


def packed_at_once(model: nn.Module, key: str) -> bool:
    """Whether ``key`` is the weight of a Linear that can be reordered as soon as it is read (its bias, if any,
    is already loaded)."""
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return attr == "weight" and isinstance(module, nn.Linear) and (module.bias is None or not module.bias.is_meta)


class Float32Weights:
    """Where a float32 load's tensors come from: a prepared file (``reader``; written behind the answers of the
    first start, ``edgevl.engine.float32_preparing``), or the checkpoint.

    Converting the checkpoint's bfloat16 into float32 makes 8.5 GB of fresh memory resident for the 2B model,
    most of a float32 start (``edgevl bench``, Targets).  A later start maps the float32 tensors from the file
    instead: the pages are the page cache's, already resident.  Where the load packs for oneDNN (its trial's
    choice), the mapped Linears answer with ``F.linear`` at once and are noted in ``deferred`` for the packer
    (``edgevl.engine.packing``): a file that holds every tensor the load takes maps every Linear.
    """

    def __init__(self, reader: PreparedReader | None = None) -> None:
        self.reader = reader
        self.deferred: list[Unpacked] = []

    def take(self, key: str) -> torch.Tensor | None:
        """The prepared tensor of ``key``, mapped; None where there is none."""
        if self.reader is None or key not in self.reader:
            return None
        return self.reader.take(key)

    def defer_all(self, model: nn.Module, root: str) -> None:
        """Note every Linear below the module ``root`` of ``model`` in ``deferred``."""
        for name, linear in model.get_submodule(root).named_modules(prefix=root):
            if isinstance(linear, nn.Linear):
                self.deferred.append(Unpacked(name, linear))
