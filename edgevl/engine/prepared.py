"""int8 and float32 weights prepared once and read back at every start.

Quantizing the 2B model's matrices (reading bfloat16, scaling every row to
int8) is most of an int8 worker's start, and making its float32 weights
resident (8.5 GB converted from the checkpoint's bfloat16 into fresh memory)
most of a float32 worker's.  The first start writes the int8 rows and their
scales, or the float32 tensors, to ``<state_dir>/prepared/``; later starts
read them one matrix at a time and hand them to the kernels as they are.  The file's name is a key of the
model's files (names, sizes, modification times), the precision, torch's
version and this format's, so a replaced model or an upgraded torch never meets
an old file.  Every tensor carries a CRC-32 that is checked as it is taken: a
damaged file is deleted and rebuilt from the model, never trusted.  The index
is written last, after the data is on disk, so a start killed while writing
leaves no file that looks complete.

Tensors are mapped from the file, not read into memory: a later start answers
from the mapped rows within seconds (``edgevl.engine.packing``), and each
matrix's mapping goes when the kernels' packed copy replaces it, so the pages
are never counted twice for long.  A prepared file is only ever replaced
(renamed over) or deleted, never rewritten in place, so what a running worker
has mapped stays valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgevl.engine.model_files import model_version, read_tensor_infos
from edgevl.engine.tuning import usable_cores
from edgevl.fsutil import atomic_write

log = logging.getLogger(__name__)

FORMAT = 2  # 2: a decoder layer's projections of one input are one tensor (edgevl.engine.fusion)
_ALIGN = 64  # every tensor starts at a multiple of this: any dtype's view is aligned
_DTYPES = {"int8": np.int8, "uint8": np.uint8, "float32": np.float32, "float64": np.float64}
_KINDS = {torch.int8: "int8", torch.uint8: "uint8", torch.float32: "float32", torch.float64: "float64"}
# Left free on the file system after a prepared file is written: the daemon's spool, outbox and results share it.
_KEEP_FREE_FRACTION = 0.05
_KEEP_FREE_BYTES = 1 << 30


class PreparedCorrupt(Exception):
    """A prepared tensor does not match its checksum."""


def location(directory: Path, model_dir: Path, precision: str) -> Path:
    """Where the prepared weights of this model, precision and torch live (without suffix)."""
    key = json.dumps([FORMAT, precision, torch.__version__, str(model_dir.resolve()), model_version(model_dir)])
    return directory / f"{precision}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def prepared_bytes(model_dir: Path, precision: str) -> int:
    """About the bytes of ``precision``'s prepared file for the model (int8: a byte a weight, scales aside; int4:
    that and half a byte again a weight of the language model's layers, which have int4 groups too)."""
    infos = read_tensor_infos(model_dir)
    size = sum(info.numel for info in infos) * (4 if precision == "float32" else 1)
    if precision == "int4":
        size += sum(info.numel for info in infos if info.name.startswith("model.language_model.layers.")) // 2
    return size


def room_for(directory: Path, size: int) -> bool:
    """Whether ``size`` more bytes in ``directory`` leave a twentieth of its file system free, and a GiB at least.

    A full disk only costs the preparing (``PreparedWriter.add``), but a float32 file is 8.5 GB for the 2B
    model: written until the disk is full at every start, it would take the room the daemon's spool and
    results need, and the time of every start."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return False
    left = usage.free - size
    if left >= max(_KEEP_FREE_FRACTION * usage.total, _KEEP_FREE_BYTES):
        return True
    log.warning("not preparing %.1f GB of weights in %s: %.1f GB free of %.1f GB", size / 1e9, directory,
                usage.free / 1e9, usage.total / 1e9)
    return False


def _index(base: Path) -> Path:
    return base.with_name(base.name + ".json")


def _data(base: Path) -> Path:
    return base.with_name(base.name + ".bin")


class PreparedReader:
    """The tensors of a complete prepared file, each mapped and checked when taken."""

    def __init__(self, base: Path, entries: dict[str, Any]) -> None:
        self.base = base
        self.entries = entries
        self.path = _data(base)
        self._checked: dict[str, np.ndarray[Any, Any]] | None = None  # mapped and checked, not yet taken
        self._lock = threading.Lock()
        self._damage: PreparedCorrupt | None = None

    @classmethod
    def open(cls, base: Path) -> PreparedReader | None:
        """The prepared weights at ``base``, or None when there are none (or no complete ones)."""
        try:
            index = json.loads(_index(base).read_text())
            if index.get("format") != FORMAT or not isinstance(index.get("tensors"), dict):
                return None
            if not _data(base).is_file():
                return None
            return cls(base, index["tensors"])
        except (OSError, ValueError):
            return None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def leave_out(self, unused: Callable[[str], bool]) -> None:
        """Never map nor check the tensors this load will not take (int4's decoder layers' int8 rows, where no
        prefill copy needs them): mapped and checked, their pages would count in the worker's memory until the
        load ends.  Before the first take only; a later call leaves what is already mapped as it is."""
        with self._lock:
            if self._checked is None:
                self.entries = {name: entry for name, entry in self.entries.items() if not unused(name)}

    def take(self, name: str) -> torch.Tensor:
        """The tensor, mapped copy-on-write: its pages are the page cache's, shared until written (never, by
        the kernels), and given back when the last reference to the tensor goes.

        The first take maps and checks every tensor of the file, one thread per usable core: the checksums
        (2 GB for the 2B model) are most of a later start's loading, and a load takes every tensor anyway.
        """
        with self._lock:  # layers are loaded one per core
            if self._damage is not None:  # checked once: the other loading threads fail at once too
                raise self._damage
            if self._checked is None:
                try:
                    with ThreadPoolExecutor(usable_cores()) as pool:  # zlib lets go of the GIL for a long buffer
                        self._checked = dict(zip(self.entries, pool.map(self._checked_array, self.entries),
                                                 strict=True))
                except PreparedCorrupt as exc:
                    self._damage = exc
                    raise
            return torch.from_numpy(self._checked.pop(name))

    def _checked_array(self, name: str) -> np.ndarray[Any, Any]:
        entry = self.entries[name]
        dtype, offset, shape = np.dtype(_DTYPES[entry["dtype"]]), int(entry["offset"]), tuple(entry["shape"])
        array: np.ndarray[Any, Any]
        try:
            array = np.memmap(self.path, dtype=dtype, mode="c", offset=offset, shape=shape)
        except ValueError as exc:  # the file is shorter than its index says
            raise PreparedCorrupt(f"{name} is cut short") from exc
        except OSError:  # a file system that cannot map files: the tensor is read instead
            count = int(np.prod(shape))
            try:
                array = np.fromfile(self.path, dtype=dtype, count=count, offset=offset)
            except OSError as exc:
                raise PreparedCorrupt(f"{name} cannot be read: {exc}") from exc
            if array.size != count:
                raise PreparedCorrupt(f"{name} is cut short") from None
            array = array.reshape(shape)
        if zlib.crc32(array.data) != entry["crc32"]:
            raise PreparedCorrupt(f"{name} does not match its checksum")
        return array

    def discard(self) -> None:
        for path in (_index(self.base), _data(self.base)):
            with contextlib.suppress(OSError):
                path.unlink()


class PreparedWriter:
    """Writes rows as the load makes them; nothing is kept in memory beyond the tensor being written."""

    def __init__(self, base: Path) -> None:
        self.base = base
        base.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _data(base).with_name(_data(base).name + ".partial")
        self.file = self.tmp.open("wb")
        self.entries: dict[str, Any] = {}
        self.offset = 0
        self.failed: OSError | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``; a write that fails (a full disk) ends the writing, never the load."""
        self.add_pieces(name, tensor.dtype, tuple(tensor.shape), [tensor])

    def add_pieces(self, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                   pieces: Iterable[torch.Tensor]) -> None:
        """Append one tensor of ``dtype`` and ``shape`` made of ``pieces`` (its rows in order), each written as it
        comes: a tensor larger than the memory it may take is never whole in memory."""
        if self.failed is not None:
            return
        try:
            self._add(name, dtype, shape, pieces)
        except OSError as exc:
            self.failed = exc
            self.abort()
            log.warning("cannot prepare the weights in %s: %s; the next start makes them from the model again",
                        self.base.parent, exc.strerror or exc)

    def _add(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], pieces: Iterable[torch.Tensor]) -> None:
        pad = -self.offset % _ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        crc, size = 0, 0
        for piece in pieces:
            data = piece.detach().contiguous().numpy().data.cast("B")
            self.file.write(data)
            crc, size = zlib.crc32(data, crc), size + len(data)
        if size != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{name}: {size} bytes written for a {dtype} tensor of shape {shape}")
        self.entries[name] = {"dtype": _KINDS[dtype], "shape": list(shape), "offset": self.offset, "crc32": crc}
        self.offset += size

    def commit(self) -> bool:
        """Data on disk first, then the index that makes it complete; older prepared files are removed."""
        if self.failed is not None:
            return False
        try:
            self._commit()
        except OSError as exc:
            self.abort()
            log.warning("cannot prepare the weights in %s: %s", self.base.parent, exc.strerror or exc)
            return False
        return True

    def _commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, _data(self.base))
        # The index last; its folder's fsync makes the data's rename durable too.
        atomic_write(_index(self.base), json.dumps({"format": FORMAT, "tensors": self.entries}).encode())
        keep = {_index(self.base).name, _data(self.base).name}
        for other in self.base.parent.iterdir():  # one model per appliance: the files of the old ones go
            if other.name not in keep and other.suffix in (".json", ".bin", ".partial", ".part"):
                with contextlib.suppress(OSError):
                    other.unlink()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()
