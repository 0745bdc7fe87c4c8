"""The int8 model's layers, made from the checkpoint's weights or from prepared rows.

Each Linear becomes an int8 kernel over its rows quantized per output channel (fbgemm's; the vision tower's
oneDNN's where the CPU has AMX, and the language model's prefill as well where the memory cap allows,
``edgevl.engine.onednn_int8``); a decoder layer's
projections of one input become one kernel (``edgevl.engine.fusion``), whose rows are prepared, and mapped
at a later start, already end to end.  The token embedding keeps the int8 rows that a tied output head
multiplies with.  Precision int4 makes the decoder layers' four-bit groups from the same rows
(``edgevl.engine.int4_kernel``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Container
from typing import Any

import torch
from torch import nn

from edgevl.engine import fusion, int4_kernel, onednn_int8
from edgevl.engine.kernels import Int8Embedding, IntMatmulLinear, quantize_rows
from edgevl.engine.packing import Deferred
from edgevl.engine.prepared import PreparedReader, PreparedWriter
from edgevl.errors import ModelError

Rows = tuple[torch.Tensor, torch.Tensor]

EMBEDDING = "model.language_model.embed_tokens.weight"


def beside_int4_groups(name: str, names: Container[str]) -> bool:
    """Whether the prepared tensor ``name`` is the int8 rows (or their scales) of a matrix whose int4 groups are
    among ``names`` as well: what a start of int4 alone never reads."""
    return name.endswith((".q", ".scales")) and f"{name.rpartition('.')[0]}.int4.packed" in names


class Int8Rows:
    """Where a load's int8 rows come from (a prepared file) or go to (a new one).

    With ``deferred`` (a list), layers whose rows are mapped from the prepared file answer with
    ``IntMatmulLinear`` at once and are noted there, to be packed for fbgemm afterwards
    (``edgevl.engine.packing``); otherwise each is packed as it is loaded.  ``prefill_copy``: the language
    model's layers may keep a second packed copy for their prefill (``onednn_int8.packed``).
    """

    def __init__(self, reader: PreparedReader | None, writer: PreparedWriter | None,
                 deferred: list[Deferred] | None = None, prefill_copy: bool = False,
                 four: ctypes.CDLL | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.deferred = deferred
        self.prefill_copy = prefill_copy
        self.four = four  # precision int4: the kernel library of the decoder layers' int4 groups
        # int4 without oneDNN's prefill copy: the decoder layers' int8 rows, prepared beside their groups for a start
        # that keeps the copy, are never read then, nor mapped (their pages would count in the worker's memory).
        self.int4_alone = four is not None and not (prefill_copy and onednn_int8.pays())
        if self.int4_alone and reader is not None:
            reader.leave_out(lambda name: beside_int4_groups(name, reader.entries))
        self.tied_head: tuple[Rows, nn.Module] | None = None  # the embedding's rows and the head packed on them

    def pack_tied_head(self) -> None:
        """Pack the output head tied to the token embedding from the embedding's prepared rows, ahead of
        ``finish_int8``, which installs both.

        Its 151,936 rows are the largest matrix to pack (fbgemm packs 0.3 GB in 2.3-2.4 s on one core of a
        2-core AVX2 host, and packing takes one core): packed after the layers, it kept one core idle at the end
        of a start; packed in a loading thread beside theirs, both stay busy.  Nothing without prepared rows,
        whose embedding is only quantized once the file's weights are read.
        """
        if self.has(EMBEDDING):
            rows = self.rows(EMBEDDING, None)
            self.tied_head = rows, self.kernel("lm_head", EMBEDDING, rows, None)

    def has(self, key: str) -> bool:
        """Whether the rows of the checkpoint weight ``key`` are prepared (alone, or in a fused layer's; int8's, or
        int4's groups)."""
        name = fusion.fused_key(key) or key
        return self.reader is not None and (f"{name}.q" in self.reader or f"{name}.int4.packed" in self.reader)

    def rows(self, key: str, weight: torch.Tensor | None) -> Rows:
        if self.reader is not None and self.has(key):
            return self.reader.take(f"{key}.q"), self.reader.take(f"{key}.scales")
        if weight is None:
            raise ModelError(f"the checkpoint lacks {key}", "model_unsupported")
        return self._made(key, quantize_rows(weight.detach()))

    def fused_rows(self, key: str, weights: list[torch.Tensor]) -> Rows:
        """The rows of the weights end to end (row by row the same as each quantized alone)."""
        if self.reader is not None and self.has(key):
            return self.rows(key, None)
        parts = [quantize_rows(weight.detach()) for weight in weights]
        return self._made(key, (torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])))

    def _made(self, key: str, rows: Rows) -> Rows:
        if self.writer is not None:
            self.writer.add(f"{key}.q", rows[0])
            self.writer.add(f"{key}.scales", rows[1])
        return rows

    def kernel(self, path: str, key: str, rows: Rows, bias: torch.Tensor | None) -> nn.Module:
        """The int8 module for the layer at ``path`` with the rows of ``key`` (precision int4: a decoder layer's
        int4 kernel, with oneDNN's int8 copy for its prefill where that is kept)."""
        four = self._int4(path, key, rows, bias)
        if four is not None and self.int4_alone:
            return four  # nothing to pack: the groups are multiplied where they are
        if self.deferred is None or not self.has(key):
            return onednn_int8.packed(path, *rows, bias, self.prefill_copy, four)
        self.deferred.append(Deferred(path, *rows, bias, four))
        return IntMatmulLinear(*rows, bias) if four is None else four  # int4 prefills until oneDNN's copy is made

    def prepared_int4(self, path: str, key: str, bias: torch.Tensor | None) -> nn.Module | None:
        """A decoder layer's int4 kernel from its prepared groups, where it needs no int8 rows (``int4_alone``);
        None otherwise."""
        names = self._int4_names(key)
        if not (path.startswith(onednn_int8.LANGUAGE_MODEL) and self.int4_alone and self.reader is not None
                and all(name in self.reader for name in names)):
            return None
        assert self.four is not None
        return int4_kernel.Int4Linear(int4_kernel.Int4Rows(*(self.reader.take(name) for name in names)), bias,
                                      self.four)

    @staticmethod
    def _int4_names(key: str) -> list[str]:
        return [f"{key}.int4.{field}" for field in int4_kernel.Int4Rows._fields]

    def _int4(self, path: str, key: str, rows: Rows, bias: torch.Tensor | None) -> nn.Module | None:
        """The int4 kernel of a decoder layer's matrix (precision int4), its groups prepared or made from
        ``rows``; None for every other layer, and for a matrix of a shape the kernel does not take."""
        if self.four is None or not path.startswith(onednn_int8.LANGUAGE_MODEL) or not int4_kernel.fits(
                *rows[0].shape):
            return None
        names = self._int4_names(key)
        if self.reader is not None and all(name in self.reader for name in names):
            groups = int4_kernel.Int4Rows(*(self.reader.take(name) for name in names))
        else:
            groups = int4_kernel.quantize_groups(*rows)
            if self.writer is not None:
                for name, tensor in zip(names, groups, strict=True):
                    self.writer.add(name, tensor)
        return int4_kernel.Int4Linear(groups, bias, self.four)


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return linear.bias.detach().float() if linear.bias is not None else None


def _fuse(module: nn.Module, prefix: str, source: Int8Rows) -> None:
    """One kernel for the projections of one input below ``module`` (an attention or an MLP), once loaded."""
    group = fusion.group_of(prefix)
    if group is None:
        return
    name, members = group
    linears = [getattr(module, member, None) for member in members]
    if not all(isinstance(linear, nn.Linear) and linear.bias is None for linear in linears):
        return  # not this architecture's projections (Qwen3-VL's have no bias): left one by one
    key = f"{prefix}.{name}.weight"
    weights = [linear.weight for linear in linears]  # type: ignore[union-attr]
    if not source.has(key) and any(weight.is_meta for weight in weights):
        return
    path = f"{prefix}.{name}.linear"
    kernel = source.prepared_int4(path, key, None) or source.kernel(path, key, source.fused_rows(key, weights), None)
    fusion.install(module, name, members, kernel, tuple(w.shape[0] for w in weights), weights[0].shape[1])


def int8_linears(module: nn.Module, prefix: str, source: Int8Rows, others: frozenset[str] = frozenset()) -> None:
    """Every Linear below ``module`` whose weight is loaded, or prepared, made int8 (its bias loaded first);
    not below the modules at ``others``, which another loading thread may be making."""
    _fuse(module, prefix, source)
    for name, child in list(module.named_children()):
        full = f"{prefix}.{name}" if prefix else name
        if full in others:
            continue
        if not isinstance(child, nn.Linear):
            int8_linears(child, full, source, others)
            continue
        key = f"{full}.weight"
        if (child.bias is not None and child.bias.is_meta) or (child.weight.is_meta and not source.has(key)):
            continue
        kernel = source.prepared_int4(full, key, _bias(child))
        if kernel is None:
            kernel = source.kernel(full, key, source.rows(key, None if child.weight.is_meta else child.weight),
                                   _bias(child))
        setattr(module, name, kernel)


def finish_int8(model: Any, source: Int8Rows) -> None:
    """int8 token embedding and output head; the float table is freed before the head is packed."""
    lm = model.model.language_model
    tied = model.lm_head.weight is lm.embed_tokens.weight
    if tied and source.tied_head is not None:  # packed by a loading thread (Int8Rows.pack_tied_head)
        (rows, model.lm_head), source.tied_head = source.tied_head, None
        lm.embed_tokens = Int8Embedding(*rows)
        return
    rows = source.rows(EMBEDDING, None if lm.embed_tokens.weight.is_meta else lm.embed_tokens.weight)
    lm.embed_tokens = Int8Embedding(*rows)
    if not tied:
        if isinstance(model.lm_head, nn.Linear):
            head_rows = source.rows("lm_head.weight", model.lm_head.weight)
            model.lm_head = source.kernel("lm_head", "lm_head.weight", head_rows, _bias(model.lm_head))
        return
    model.lm_head = nn.Identity()  # drops the last reference to the float table
    # The head multiplies with the embedding's own int8 rows: one quantization, one prepared copy.
    model.lm_head = source.kernel("lm_head", EMBEDDING, rows, None)
