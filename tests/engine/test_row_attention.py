"""Precision int4's decode-step attention (edgevl/engine/attend.c through edgevl.engine.row_attention): attention's
values over a bfloat16 cache on every instruction set this CPU has, hidden slots never read, the passes it leaves
to SDPA, and the engine's own decode steps (a single frame's and the stream mode's) attending through it."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevl.engine import int4_kernel, row_attention
from edgevl.engine.attention import grouped_sdpa_attention
from edgevl.engine.engine import Engine, Frame
from edgevl.engine.loading import load_model
from edgevl.engine.row_attention import RowAttention
from edgevl.questions import Question
from tests.harness.images import noise_image
from tests.harness.int4 import levels


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return int4_kernel.library(tmp_path_factory.mktemp("kernels"))


def cache(kv_heads: int, slots: int, dim: int, seed: int, room: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values as the packed sequence's cache holds them: bfloat16 views of the first ``slots`` of
    buffers with room beyond."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, kv_heads, slots + room, dim, generator=g).bfloat16()
    values = torch.randn(1, kv_heads, slots + room, dim, generator=g).bfloat16()
    return keys[:, :, :slots], values[:, :, :slots]


def reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """Attention in float32 (the cache's values exactly, as float32), (1, 1, heads, dim) as the kernel's."""
    out = F.scaled_dot_product_attention(query, keys.float(), values.float(), attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "slots"),
                         [(16, 8, 128, 1100), (4, 2, 32, 5), (6, 6, 40, 33), (8, 2, 72, 300), (16, 1, 24, 9)])
def test_every_instruction_set_computes_attention_over_the_seen_slots(lib: ctypes.CDLL, heads: int, kv_heads: int,
                                                                      dim: int, slots: int) -> None:
    keys, values = cache(kv_heads, slots, dim, seed=slots)
    query = torch.randn(1, 1, heads, dim, generator=torch.Generator().manual_seed(1)).transpose(1, 2)
    mask = torch.rand(1, 1, 1, slots, generator=torch.Generator().manual_seed(2)) < 0.7
    mask[..., -1] = True  # a token always sees its own slot
    scale = dim ** -0.5
    want = reference(query, keys, values, mask, scale)
    for limit in levels(lib):
        got = RowAttention(lib, limit)(query, keys, values, mask, scale)
        assert got is not None
        assert got.shape == (1, 1, heads, dim)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"instruction set {limit}")


def test_hidden_slots_are_never_read_and_a_row_that_sees_none_gets_zeros(lib: ctypes.CDLL) -> None:
    keys, values = cache(2, 20, 32, seed=3)
    keys[0, :, 5] = float("nan")  # a slot no token has written: the joined cache's room, say
    values[0, :, 5] = float("inf")
    query = torch.randn(1, 4, 1, 32)
    mask = torch.ones(1, 1, 1, 20, dtype=torch.bool)
    mask[..., 5] = False
    clean = mask.clone()
    for limit in levels(lib):
        kernel = RowAttention(lib, limit)
        got = kernel(query, keys, values, mask, 0.2)
        assert got is not None
        assert torch.isfinite(got).all()
        keys_ok, values_ok = keys.clone(), values.clone()
        keys_ok[0, :, 5] = 0.0
        values_ok[0, :, 5] = 0.0
        torch.testing.assert_close(got, reference(query, keys_ok, values_ok, clean, 0.2), rtol=1e-5, atol=1e-5)
        nothing = kernel(query, keys, values, torch.zeros(1, 1, 1, 20, dtype=torch.bool), 0.2)
        assert nothing is not None
        assert torch.equal(nothing, torch.zeros(1, 1, 4, 32))


@settings(max_examples=40, deadline=None)
@given(kv_heads=st.integers(1, 4), group=st.integers(1, 4), dim=st.integers(1, 70), slots=st.integers(1, 200),
       seed=st.integers(0, 2**16), scale=st.floats(0.01, 4.0),
       damage=st.sampled_from([None, 1e4, -1e4, 0.0]))
def test_any_shape_and_cache_end_in_attention_values(tmp_path_factory: pytest.TempPathFactory, kv_heads: int,
                                                     group: int, dim: int, slots: int, seed: int, scale: float,
                                                     damage: float | None) -> None:
    lib = int4_kernel.library(tmp_path_factory.getbasetemp() / "kernels-any")
    keys, values = cache(kv_heads, slots, dim, seed)
    if damage is not None:  # a key far larger than the others: the softmax must not overflow
        keys[0, 0, seed % slots] = damage
    g = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(1, kv_heads * group, 1, dim, generator=g)
    mask = torch.rand(1, 1, 1, slots, generator=g) < 0.5
    mask[..., seed % slots] = True
    want = reference(query, keys, values, mask, scale)
    for limit in levels(lib):
        got = RowAttention(lib, limit)(query, keys, values, mask, scale)
        assert got is not None
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _Module(torch.nn.Module):
    def __init__(self, heads: int, kv_heads: int, dim: int, kernel: RowAttention | None) -> None:
        super().__init__()
        self.head_dim = dim
        self.num_key_value_groups = heads // kv_heads
        self.is_causal = True
        if kernel is not None:
            setattr(self, row_attention.ATTRIBUTE, kernel)


def test_the_attention_interface_takes_one_row_to_the_kernel_and_leaves_the_rest_to_sdpa(lib: ctypes.CDLL) -> None:
    keys, values = cache(2, 30, 32, seed=4)
    module = _Module(4, 2, 32, RowAttention(lib))
    plain = _Module(4, 2, 32, None)
    mask = torch.ones(1, 1, 1, 30, dtype=torch.bool)
    one = torch.randn(1, 4, 1, 32)
    out, _ = grouped_sdpa_attention(module, one, keys, values, mask, scaling=0.3)
    torch.testing.assert_close(out, reference(one, keys, values, mask, 0.3), rtol=1e-5, atol=1e-5)
    # Not rounded to bfloat16 as SDPA's way over this cache rounds it: the two differ, within bfloat16's rounding.
    rounded, _ = grouped_sdpa_attention(plain, one, keys, values, mask, scaling=0.3)
    assert not torch.equal(out, rounded)
    torch.testing.assert_close(out, rounded, rtol=0.05, atol=0.02)
    # Two rows, or a float32 cache: SDPA's, exactly as without the kernel.
    two = torch.randn(1, 4, 2, 32)
    mask2 = torch.ones(1, 1, 2, 30, dtype=torch.bool)
    assert torch.equal(grouped_sdpa_attention(module, two, keys, values, mask2, scaling=0.3)[0],
                       grouped_sdpa_attention(plain, two, keys, values, mask2, scaling=0.3)[0])
    assert torch.equal(grouped_sdpa_attention(module, one, keys.float(), values.float(), mask, scaling=0.3)[0],
                       grouped_sdpa_attention(plain, one, keys.float(), values.float(), mask, scaling=0.3)[0])


class _Checked:
    """The engine's own RowAttention, each call set against float32 SDPA on the very cache it attends over."""

    def __init__(self, inner: RowAttention) -> None:
        self.inner = inner
        self.taken = 0

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 scaling: float) -> torch.Tensor | None:
        out = self.inner(query, key, value, mask, scaling)
        if out is not None:
            self.taken += 1
            torch.testing.assert_close(out, reference(query, key, value, mask, scaling), rtol=1e-4, atol=1e-4)
        return out


@pytest.fixture
def checked_int4(grouped_model_dir: Path) -> tuple[Engine, list[_Checked]]:
    lm = load_model(str(grouped_model_dir), "int4", 1, prefill_copy=False)
    spies = []
    for layer in lm.model.model.language_model.layers:
        spy = _Checked(getattr(layer.self_attn, row_attention.ATTRIBUTE))
        setattr(layer.self_attn, row_attention.ATTRIBUTE, spy)
        spies.append(spy)
    return Engine(lm), spies


QUESTIONS = [Question(id="d", ask="Is there a defect?", type="yes_no"),
             Question(id="t", ask="Read the label.", max_tokens=6)]


def test_an_int4_frames_decode_steps_attend_through_the_kernel(checked_int4: tuple[Engine, list[_Checked]]) -> None:
    engine, spies = checked_int4
    answered = engine.answer(noise_image(96, 80, seed=6), QUESTIONS, 96 * 96, force_full_length=True)
    assert set(answered.answers) == {"d", "t"}
    # Every layer, every decode step of the text answer (its first token comes from the prefill's pass).
    assert [spy.taken for spy in spies] == [answered.decode_steps] * len(spies)
    assert answered.decode_steps == 5


def test_the_stream_modes_frames_each_attend_over_their_own_span_through_it(
        checked_int4: tuple[Engine, list[_Checked]]) -> None:
    engine, spies = checked_int4
    frames = [Frame(noise_image(96, 80, seed=seed), QUESTIONS, 96 * 96) for seed in (7, 8, 9)]
    answered = engine.answer_frames(frames, force_full_length=True)
    assert len(answered) == 3
    assert all(not isinstance(a, Exception) for a in answered)
    # Three frames share each of the five steps, each frame's row attending alone over its span.
    assert all(spy.taken == 3 * 5 for spy in spies)
