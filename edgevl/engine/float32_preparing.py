"""A float32 model's prepared weights, written behind the answers of its first start.

A later float32 start maps them instead of converting the checkpoint's bfloat16 into fresh memory
(``edgevl.engine.weight_reading.Float32Weights``).  Written as the first start loads, the 8.5 GB of the 2B model
held that start for as long as the disk took: 50 s against 20 s on a 2-core host with an SSD, and minutes where the
state directory is on an SD card.  A thread of low priority writes them once the model answers instead: it reads
the checkpoint's tensors again (most from the page cache, the load has just read them) in pieces, converts each to
float32 as the load does (bfloat16 to float32 is exact: the same values) and appends it, the index last
(``edgevl.engine.prepared``), so a start stopped midway leaves nothing that a later one reads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgevl.engine.background import BehindTheAnswers
from edgevl.engine.model_files import TensorInfo, read_tensor_infos
from edgevl.engine.prepared import PreparedWriter

log = logging.getLogger(__name__)

_PIECE_BYTES = 64 << 20  # float32 bytes converted and written at a time
_NICE = 10  # the answers come first


class _Stopped(Exception):
    pass


class Preparer(BehindTheAnswers):
    """Writes the float32 weights of the model at ``model_dir`` to the prepared file ``base`` in one background
    thread; ``done`` is set when it ends, ``written`` says whether the file is complete.  Stopped (an exit), it
    stops between two pieces and removes what it wrote."""

    def __init__(self, model_dir: Path, base: Path) -> None:
        super().__init__("edgevl-prepare")
        self.model_dir = model_dir
        self.base = base
        self.written = False
        self.seconds = 0.0

    @property
    def outcome(self) -> str:
        """What a load reports of its prepared weights: "preparing" until the writing ends, then "written" or
        "none" (failed or stopped)."""
        if not self.done.is_set():
            return "preparing"
        return "written" if self.written else "none"

    def _work(self) -> None:
        with contextlib.suppress(OSError):  # a thread's own niceness (Linux); elsewhere the same priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        started = time.monotonic()
        writer: PreparedWriter | None = None
        try:
            writer = PreparedWriter(self.base)
            self._write(writer)
            self.written = writer.commit()
        except _Stopped:
            log.info("preparing the float32 weights stopped with the worker; the next start prepares them")
        except Exception as exc:  # OSError and MemoryError included: the answers never depend on this file
            log.warning("cannot prepare the float32 weights in %s: %s", self.base.parent, exc)
        finally:
            if writer is not None and not self.written:
                writer.abort()
            self.seconds = time.monotonic() - started
            if self.written:
                log.info("float32 weights prepared for the next start in %.1f s", self.seconds)

    def _write(self, writer: PreparedWriter) -> None:
        for info in read_tensor_infos(self.model_dir):
            with info.file.open("rb", buffering=0) as f:
                writer.add_pieces(info.name, torch.float32, info.shape, self._pieces(f.fileno(), info))
            if writer.failed is not None:
                return  # logged and removed by the writer: a full disk
        if self._stopping.is_set():
            raise _Stopped

    def _pieces(self, fd: int, info: TensorInfo) -> Iterator[torch.Tensor]:
        """The tensor of ``info`` in float32, some rows at a time.

        Read with ``pread`` and converted by numpy in this thread: a mapping of the checkpoint (safetensors')
        counted each shard it had read in the worker's resident size, 2 GB above the answers' peak, and torch's
        conversion ran on the answers' own thread pool, outside this thread's low priority."""
        convert = _FLOAT32.get(info.dtype)
        if convert is None:
            raise ValueError(f"{info.name} is {info.dtype}, not a floating-point tensor this load converts")
        row = math.prod(info.shape[1:]) if info.shape else 1
        rows = info.shape[0] if info.shape else 1
        itemsize = 4 if info.dtype == "F32" else 2
        step = max(1, _PIECE_BYTES // max(1, row * 4))
        for start in range(0, rows, step):
            if self._stopping.is_set():
                raise _Stopped
            count = min(step, rows - start) * row
            raw = os.pread(fd, count * itemsize, info.offset + start * row * itemsize)
            if len(raw) != count * itemsize:
                raise OSError(f"{info.file} is cut short in {info.name}")
            yield torch.from_numpy(convert(raw))


def _from_bfloat16(raw: bytes) -> np.ndarray[Any, Any]:
    # A bfloat16 is the upper half of the float32 of the same value: the conversion is exact, as torch's.
    widened: np.ndarray[Any, Any] = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
    return widened.view(np.float32)


def _from(dtype: type[np.generic]) -> Callable[[bytes], np.ndarray[Any, Any]]:
    def convert(raw: bytes) -> np.ndarray[Any, Any]:
        return np.frombuffer(raw, dtype=dtype).astype(np.float32)
    return convert


# The checkpoint dtypes a float32 load converts (safetensors' names).
_FLOAT32: dict[str, Callable[[bytes], np.ndarray[Any, Any]]] = {
    "BF16": _from_bfloat16, "F16": _from(np.float16), "F32": _from(np.float32)}
