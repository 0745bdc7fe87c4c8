"""The stream mode's joined cache: each frame's cache followed by room for its answers, each token written at its
frame's next slot, and each frame's rows attending over its own span alone, bit for bit as over its own cache."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevl.engine import attention, spans
from edgevl.engine.engine import Engine, Frame
from edgevl.engine.kvcache import join, new_cache
from tests.engine.test_attention import _Heads
from tests.engine.test_stream import FRAMES

KV_HEADS, GROUPS, DIM = 2, 2, 16


def _text_config() -> Any:
    """A text config of two layers."""
    from transformers import Qwen3VLTextConfig

    return Qwen3VLTextConfig(num_hidden_layers=2, num_attention_heads=KV_HEADS * GROUPS, num_key_value_heads=KV_HEADS,
                             hidden_size=KV_HEADS * GROUPS * DIM, head_dim=DIM)


def _cache(length: int, seed: int) -> Any:
    torch.manual_seed(seed)
    cache = new_cache(_text_config())
    for index in range(2):
        cache.update(torch.randn(1, KV_HEADS, length, DIM), torch.randn(1, KV_HEADS, length, DIM), index)
    return cache


def test_join_lays_the_caches_end_to_end_each_followed_by_zeroed_room_and_spends_them() -> None:
    first, second = _cache(5, 1), _cache(3, 2)
    held = [[(c.layers[i].keys.clone(), c.layers[i].values.clone()) for i in range(2)] for c in (first, second)]
    joined = join([first, second], [5, 3], [2, 4], _text_config())
    for index in range(2):
        keys, values = joined.layers[index].keys, joined.layers[index].values
        assert keys.shape[-2] == 5 + 2 + 3 + 4
        assert torch.equal(keys[..., 0:5, :], held[0][index][0])
        assert torch.equal(keys[..., 7:10, :], held[1][index][0])
        assert torch.equal(values[..., 7:10, :], held[1][index][1])
        assert not keys[..., 5:7, :].any()
        assert not keys[..., 10:14, :].any()
        # Each part's layer is released once copied: the join never holds the frames' caches twice.
        assert not first.layers[index].is_initialized
        assert not second.layers[index].is_initialized


def test_a_pass_writes_each_token_at_its_slot_and_never_beyond_the_joined_cache() -> None:
    joined = join([_cache(4, 1), _cache(4, 2)], [4, 4], [2, 2], _text_config())
    new_keys, new_values = torch.randn(1, KV_HEADS, 2, DIM), torch.randn(1, KV_HEADS, 2, DIM)
    plan = spans.FrameSpans(torch.tensor([4, 10]), ())
    keys, values = joined.update(new_keys, new_values, 0, kwargs={spans.KWARG: plan})
    assert keys.shape[-2] == 12
    assert torch.equal(keys[..., 4, :], new_keys[..., 0, :])
    assert torch.equal(keys[..., 10, :], new_keys[..., 1, :])
    assert torch.equal(values[..., 10, :], new_values[..., 1, :])
    assert not keys[..., 5, :].any()
    assert not keys[..., 11, :].any()
    with pytest.raises(RuntimeError, match="beyond the joined cache"):
        joined.update(new_keys, new_values, 1, kwargs={spans.KWARG: spans.FrameSpans(torch.tensor([11, 12]), ())})


@settings(max_examples=60, deadline=None)
@given(frames=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 3), st.integers(0, 6)), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_each_frames_rows_attend_as_over_its_own_cache_alone(frames: list[tuple[int, int, int]], seed: int) -> None:
    """(length of a frame's cache, its rows in the pass, room left after them): the pass's output for a frame's
    rows is, bit for bit, the attention over that frame's own cache with its own mask."""
    generator = torch.Generator().manual_seed(seed)
    module = _Heads(GROUPS)
    capacity = sum(length + rows + room for length, rows, room in frames)
    keys = torch.randn(1, KV_HEADS, capacity, DIM, generator=generator)
    values = torch.randn(1, KV_HEADS, capacity, DIM, generator=generator)
    count = sum(rows for _, rows, _ in frames)
    query = torch.randn(1, KV_HEADS * GROUPS, count, DIM, generator=generator)
    mask = torch.zeros(1, 1, count, capacity, dtype=torch.bool)
    groups, alone, row, base = [], [], 0, 0
    for length, rows, room in frames:
        end = base + length + rows
        own = torch.arange(row, row + rows)
        mask[0, 0, own, base:end] = torch.rand(rows, end - base, generator=generator) > 0.3
        mask[0, 0, own, base] = True  # every row sees at least its frame's first slot
        groups.append((own, base, end))
        theirs, _ = attention.grouped_sdpa_attention(
            module, query[:, :, own].clone(), keys[:, :, base:end].clone(), values[:, :, base:end].clone(),
            mask[:, :, own, base:end].clone(), scaling=DIM**-0.5)
        alone.append(theirs)
        row, base = row + rows, end + room
    plan = spans.FrameSpans(torch.arange(count), tuple(groups))
    ours, _ = attention.grouped_sdpa_attention(module, query, keys, values, mask, scaling=DIM**-0.5,
                                               **{spans.KWARG: plan})
    for (own, _, _), theirs in zip(groups, alone, strict=True):
        assert torch.equal(ours[:, own], theirs)


def test_in_a_stream_every_pass_attends_each_frame_over_its_own_span(fp32_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Several frames decode together: each frame's rows attend over a span holding its own slots only, the spans
    of one pass never overlap, and together they are less than the joined cache."""
    seen: list[tuple[int, tuple[tuple[int, int], ...]]] = []
    real = attention._by_frame

    def spy(module: Any, query: Any, key: Any, value: Any, mask: Any, plan: spans.FrameSpans,
            *args: Any) -> Any:
        seen.append((key.shape[-2], tuple((start, end) for _, start, end in plan.groups)))
        return real(module, query, key, value, mask, plan, *args)

    monkeypatch.setattr(attention, "_by_frame", spy)
    frames = [Frame(f.image, f.questions, f.max_pixels) for f in FRAMES[:3]]
    Engine(fp32_model, max_batch=8).answer_frames(frames)
    assert any(len(groups) > 1 for _, groups in seen), "the frames never decoded in one pass"
    for length, groups in seen:  # a pass after the others' answers ended holds one frame's rows
        ordered = sorted(groups)
        assert all(start < end <= length for start, end in ordered)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(ordered))
        assert sum(end - start for start, end in groups) < length


def test_a_frames_answers_never_outgrow_their_room(fp32_model) -> None:  # type: ignore[no-untyped-def]
    """The room is counted from the branches' budgets; a token beyond it is refused, not written into the next
    frame's slots."""
    from edgevl.engine.decoding import PackedSequence

    engine = Engine(fp32_model, max_batch=8)
    parts = [engine._prefilled(index, frame, False)[1] for index, frame in enumerate(FRAMES[:2])]
    joined, _ = PackedSequence.join(parts, [1, 0])
    first, second = joined.prefixes
    assert joined.claim(first) == joined.rooms[first].end - 1
    with pytest.raises(RuntimeError, match="outgrew"):
        joined.claim(first)
    with pytest.raises(RuntimeError, match="outgrew"):
        joined.claim(second)
