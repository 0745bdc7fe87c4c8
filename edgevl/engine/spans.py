"""A decode pass of several frames (the stream mode): where each token is written in the joined cache, and which
span of that cache each frame's rows attend.

The joined cache lays each frame's own cache down followed by room for its answers' tokens
(``edgevl.engine.decoding``), so a frame's span, its cache and its answers so far, is contiguous.  A token sees
only its own frame's slots, so attention runs frame by frame over that span instead of over every frame's
slots under a mask: with eight W4 frames attending through the mask, attention was more than half of a decode
step (int8, 2B shapes, 2-core AMD EPYC: 0.205 s a step, 0.092 s with attention left out).  A frame's span holds
the very slots its cache holds when it is answered alone, in the same order, so its rows attend to the same
keys as alone.

The plan reaches the cache and the attention function as a keyword argument of the language model's forward,
which transformers hands to both (``cache.update(..., kwargs=...)`` and the attention interface's ``**kwargs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

KWARG = "frame_spans"


@dataclass(frozen=True)
class FrameSpans:
    """One pass: ``slots[i]`` is the cache slot token ``i`` is written to; each group is a frame's rows of the
    pass and the span ``[start, end)`` of the cache they attend to."""

    slots: torch.Tensor
    groups: tuple[tuple[torch.Tensor, int, int], ...]


def of(kwargs: Mapping[str, Any]) -> FrameSpans | None:
    """The pass's plan among the keyword arguments of an attention function or a cache layer's update."""
    plan = kwargs.get(KWARG)
    nested = kwargs.get("kwargs")
    if plan is None and isinstance(nested, Mapping):
        plan = nested.get(KWARG)
    return plan if isinstance(plan, FrameSpans) else None


def without(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` less the plan."""
    return {key: value for key, value in kwargs.items() if key != KWARG}
