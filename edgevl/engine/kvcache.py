"""The packed sequence's KV cache: transformers' ``DynamicCache`` whose layers write each pass's keys and
values in place, into buffers with room to grow.

``DynamicLayer`` concatenates: every pass copies the layer's whole cache into a fresh allocation, which the
kernel must also fault in page by page.  With several frames' prefixes in one cache (the stream mode) that
is most of the cost of a decode step beside the weights.  Here a pass copies only its own tokens; the layer's
keys and values are views of the first ``length`` slots, which attention reads as they are (the same values,
bit for bit, as a contiguous copy).  They hold the type ``stored_dtype`` gives the model's precision: an int8
model's bfloat16, half the bytes each decode step's attention reads.

Several frames' caches joined for the stream mode (``join``) are laid end to end, each followed by zeroed room
for its answers' tokens; a decode pass then writes each token at the slot its frame's room gives it
(``edgevl.engine.spans``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from edgevl.config import INT8_ROWS
from edgevl.engine import spans

# Slots reserved beyond what a pass needs, at least: a frame's questions and answers fit without a regrowth.
MIN_ROOM = 256


class GrowingLayer(DynamicLayer):  # type: ignore[misc]  # transformers is untyped
    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.stored = dtype  # the type its slots hold (None: the type the keys and values come in)
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        plan = spans.of(kwargs)
        if plan is not None:
            return self._scatter(key_states, value_states, plan.slots)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        end = self.length + count
        keys, values = self._keys, self._values
        if keys is None or values is None or end > keys.shape[-2]:
            keys, values = self._grow(key_states, value_states, end)
        keys[..., self.length: end, :].copy_(key_states)
        values[..., self.length: end, :].copy_(value_states)
        self.length = end
        self.keys = keys[..., :end, :]
        self.values = values[..., :end, :]
        return self.keys, self.values

    def _scatter(self, key_states: torch.Tensor, value_states: torch.Tensor,
                 slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each token at its own slot of a joined cache, which already holds every slot it will use."""
        keys, values = self._keys, self._values
        if keys is None or values is None or int(slots.max()) >= self.length:
            raise RuntimeError("a pass writes beyond the joined cache")
        keys.index_copy_(-2, slots, key_states.to(keys.dtype))
        values.index_copy_(-2, slots, value_states.to(values.dtype))
        return self.keys, self.values

    def hold(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold ``keys`` and ``values`` (whole) as the layer's slots, in their type."""
        self.lazy_initialization(keys, values)
        self.stored = keys.dtype
        self._keys, self._values = keys, values
        self.keys, self.values = keys, values
        self.length = keys.shape[-2]

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor,
              needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A quarter more keeps regrowths rare while the room held beyond what is written stays small: the
        # worker's memory ceiling counts it.
        capacity = needed + max(needed // 4, MIN_ROOM)
        dtype = self.stored or key_states.dtype
        keys = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]), dtype=dtype)
        values = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]), dtype=dtype)
        if self._keys is not None and self._values is not None and self.length:
            keys[..., : self.length, :].copy_(self._keys[..., : self.length, :])
            values[..., : self.length, :].copy_(self._values[..., : self.length, :])
        self._keys, self._values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        self._keys = self._values = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the packed sequence never drops slots")


def stored_dtype(precision: str) -> torch.dtype | None:
    """The type an answer's cache holds its keys and values in, for a model of ``precision`` (None: the type
    they come in).

    A decode step's attention reads every slot of every layer's keys and values, cold: the step has streamed
    the weights through the caches since.  float32 reads them at a fraction of the memory's rate (a 2-core
    AMD EPYC, one row over 1,100 slots: 1.1-1.2 ms a layer, against 0.66-0.73 ms in bfloat16), a third of a
    long answer's decode step.  An int8 (or int4) model's keys and values come from products of inputs rounded to
    256 levels, so bfloat16's 8-bit mantissa adds little to its rounding; float32 keeps float32, its answers
    token-identical to transformers' ``generate()``; bfloat16's already are bfloat16.
    """
    return torch.bfloat16 if precision in INT8_ROWS else None


def new_cache(text_config: Any, dtype: torch.dtype | None = None) -> DynamicCache:
    """An empty cache for the language model of ``text_config``, with growing layers holding ``dtype``."""
    cache = DynamicCache(config=text_config)
    cache.layers = [GrowingLayer(dtype) for _ in range(len(cache.layers))]
    return cache


def join(caches: list[DynamicCache], lengths: list[int], rooms: list[int], text_config: Any) -> DynamicCache:
    """The first ``lengths[i]`` slots of each cache end to end, each followed by ``rooms[i]`` zeroed slots; the
    caches are spent, each layer released once it is copied, so that the join holds at most one layer twice
    (eight W4 frames, int8, 2B shapes: the process's peak fell from 4.93 to 4.36 GB).

    Zeroed, not left as they come: a slot no token has been written to yet is never attended (masked, or
    outside every span), but a masked garbage key could still be NaN, and NaN survives a mask in the sum.
    """
    joined = new_cache(text_config)
    for index, layer in enumerate(joined.layers):
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for cache, length, room in zip(caches, lengths, rooms, strict=True):
            own = cache.layers[index]
            for held, into in ((own.keys, keys), (own.values, values)):
                into.append(held[..., :length, :])
                into.append(held.new_zeros((*held.shape[:-2], room, held.shape[-1])))
        layer.hold(torch.cat(keys, dim=-2), torch.cat(values, dim=-2))
        del keys, values
        for cache in caches:
            cache.layers[index] = GrowingLayer()
    return joined
