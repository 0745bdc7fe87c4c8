"""The int8 model's layers, made from the checkpoint's weights or from prepared rows.

Each Linear becomes an int8 kernel over its rows quantized per output channel (fbgemm's; the vision tower's
oneDNN's where the CPU has AMX, and the language model's prefill as well where the memory cap allows,
``edgevl.engine.onednn_int8``); a decoder layer's
projections of one input become one kernel (``edgevl.engine.fusion``), whose rows are prepared, and mapped
at a later start, already end to end.  The token embedding keeps the int8 rows that a tied output head
multiplies with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgevl.engine import fusion, onednn_int8
from edgevl.engine.kernels import Int8Embedding, IntMatmulLinear, quantize_rows
from edgevl.engine.packing import Deferred
from edgevl.engine.prepared import PreparedReader, PreparedWriter
from edgevl.errors import ModelError

Rows = tuple[torch.Tensor, torch.Tensor]

EMBEDDING = "model.language_model.embed_tokens.weight"


class Int8Rows:
    """Where a load's int8 rows come from (a prepared file) or go to (a new one).

    With ``deferred`` (a list), layers whose rows are mapped from the prepared file answer with
    ``IntMatmulLinear`` at once and are noted there, to be packed for fbgemm afterwards
    (``edgevl.engine.packing``); otherwise each is packed as it is loaded.  ``prefill_copy``: the language
    model's layers may keep a second packed copy for their prefill (``onednn_int8.packed``).
    """

    def __init__(self, reader: PreparedReader | None, writer: PreparedWriter | None,
                 deferred: list[Deferred] | None = None, prefill_copy: bool = False) -> None:
        self.reader = reader
        self.writer = writer
        self.deferred = deferred
        self.prefill_copy = prefill_copy
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
        """Whether the rows of the checkpoint weight ``key`` are prepared (alone, or in a fused layer's)."""
        return self.reader is not None and f"{fusion.fused_key(key) or key}.q" in self.reader

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
        """The int8 module for the layer at ``path`` with the rows of ``key``."""
        if self.deferred is None or not self.has(key):
            return onednn_int8.packed(path, *rows, bias, self.prefill_copy)
        self.deferred.append(Deferred(path, *rows, bias))
        return IntMatmulLinear(*rows, bias)


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
    rows = source.fused_rows(key, weights)
    kernel = source.kernel(f"{prefix}.{name}.linear", key, rows, None)
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
        rows = source.rows(key, None if child.weight.is_meta else child.weight)
        setattr(module, name, source.kernel(full, key, rows, _bias(child)))


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
