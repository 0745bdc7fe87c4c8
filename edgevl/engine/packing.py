"""Layers packed in the background while the model already answers: int8's for fbgemm, float32's for oneDNN.

fbgemm's int8 Linear wants its weights in a layout of its own, and packing the
2B model's 2.1 GB of int8 rows is most of an int8 start (``edgevl bench``
measures it: ready, and full speed).  A start from prepared weights therefore
answers at once with ``IntMatmulLinear`` (``torch._int_mm``) on the rows
mapped from the prepared file, while one thread packs the layers for fbgemm and
swaps each in as it is ready: the language model's first, as a decode step
reads every one of them, then the output head, then the vision tower (which
prefills, where ``_int_mm`` is nearly as fast; oneDNN packs it where the CPU has AMX,
``edgevl.engine.onednn_int8``).  One thread leaves the other
core to the answers, and the answers use one thread fewer until it is done
(``answer_threads``).

A swap is one attribute assignment, so a forward pass already inside a layer
finishes with the module it started with.  Until the last swap, a layer's
answers are the ``_int_mm`` kernel's, which quantizes activations per row and
symmetrically where fbgemm quantizes them per call with a zero point: the same
int8 weights, answers within int8 rounding of each other
(tests/engine/test_kernels.py, tests/engine/test_packing.py).

A float32 start from prepared weights (``edgevl.engine.prepared``) answers the same way with ``F.linear`` on the
mapped float32 weights where its trial chose oneDNN's packed kernel (``edgevl.engine.float32_packing``), and the
same thread reorders each Linear into it: the same float32 products, summed in the packed kernel's order.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from edgevl.engine import onednn_int8
from edgevl.engine.background import BehindTheAnswers

log = logging.getLogger(__name__)


@dataclass
class Deferred:
    """A layer answering with ``_int_mm`` until its packed copy is made (fbgemm's; oneDNN's for the vision tower
    on a CPU with AMX)."""

    path: str  # the module's name in the model, e.g. model.language_model.layers.0.mlp.down_proj
    q: torch.Tensor
    scales: torch.Tensor  # float64, as fbgemm takes them
    bias: torch.Tensor | None
    four: nn.Module | None = None  # the layer's int4 kernel (precision int4), which needs no packing

    def packed(self, prefill_copy: bool) -> nn.Module:
        return onednn_int8.packed(self.path, self.q, self.scales, self.bias, prefill_copy, self.four)


class Pending(Protocol):
    """A layer that answers unpacked until the packer swaps in ``packed(prefill_copy)``."""

    path: str

    def packed(self, prefill_copy: bool) -> nn.Module: ...


def _order(item: Pending) -> int:
    if item.path.startswith("model.language_model."):
        return 0
    return 1 if item.path == "lm_head" else 2


class Packer(BehindTheAnswers):
    """Packs the deferred layers of ``model`` in one background thread; ``done`` is set when it ends.

    The packer owns ``deferred`` (sorted in place, emptied as it packs): a layer's mapped rows are held by
    no list once it is swapped.  ``gate``: packing waits until it is set (tests answer with the layers still
    unpacked).  Stopped (an exit), it stops after the layer being packed; the layers not yet packed keep
    answering unpacked.
    """

    def __init__(self, model: Any, deferred: list[Pending], gate: threading.Event | None = None,
                 prefill_copy: bool = False) -> None:
        super().__init__("edgevl-pack")
        self.model = model
        self.prefill_copy = prefill_copy  # the language model's layers packed for oneDNN's prefill as well
        self.total = len(deferred)
        self.packed = 0
        self.seconds = 0.0
        self.failed: str | None = None
        deferred.sort(key=_order)
        self._deferred = deferred
        self._gate = gate

    def _release(self) -> None:
        if self._gate is not None:
            self._gate.set()

    def _work(self) -> None:
        if self._gate is not None:
            self._gate.wait()
        started = time.monotonic()
        try:
            while self._deferred and not self._stopping.is_set():
                self._swap(self._deferred.pop(0))
                self.packed += 1
        except Exception as exc:  # MemoryError included: every layer not yet swapped keeps answering
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("packing the layers stopped after %d of %d; the rest answer unpacked", self.packed,
                          self.total)
        finally:
            self.seconds = time.monotonic() - started
            if self.failed is None and not self._deferred:
                log.info("%d layers packed behind the answers in %.1f s", self.total, self.seconds)
            self._deferred.clear()

    def _swap(self, item: Pending) -> None:
        parent, _, name = item.path.rpartition(".")
        owner = self.model.get_submodule(parent) if parent else self.model
        # The mapped weights go with the unpacked module, its last holder once this item is dropped.
        setattr(owner, name, item.packed(self.prefill_copy))


def answer_threads(packer: Packer | None, threads: int) -> int:
    """The threads a forward pass may use while ``packer`` (if any) runs: one core is the packer's.

    The answers' thread pool waits at every parallel step for its slowest thread, and a thread sharing its core
    with the packer is the slowest: on 2 cores (2B shapes, a later int8 start) the first frame took 15.9 s and
    the packing 15.5 s with two answering threads, 8.7 s and 9.8 s with one.
    """
    packing = packer is not None and not packer.done.is_set()
    return max(1, threads - 1) if packing else threads
