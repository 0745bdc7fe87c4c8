"""The float32 weights a first start prepares behind its answers: the values a float32 load converts the
checkpoint's tensors to, bit for bit, whatever their dtype and size; a checkpoint it cannot read ends the
preparing, never the worker."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from edgevl.engine import float32_preparing
from edgevl.engine.float32_preparing import Preparer
from edgevl.engine.prepared import PreparedReader, location


def _prepare(model_dir: Path, prepared: Path) -> Preparer:
    preparer = Preparer(model_dir, location(prepared, model_dir, "float32"))
    preparer.start()
    assert preparer.wait(60)
    return preparer


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_every_bfloat16_and_float16_value_is_the_float32_a_load_converts_it_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(float32_preparing, "_PIECE_BYTES", 4096)  # many pieces, one ending partway
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)  # all 65,536 bit patterns
    tensors = {
        "bf16": every.clone().view(torch.bfloat16).reshape(256, 256),
        "f16": every.clone().view(torch.float16).reshape(1024, 64),
        "f32": torch.randn(333, 7),
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "vector": torch.randn(5, dtype=torch.float16),
    }
    model = tmp_path / "model"
    model.mkdir()
    save_file(tensors, str(model / "model.safetensors"))
    prepared = tmp_path / "prepared"
    assert _prepare(model, prepared).written
    reader = PreparedReader.open(location(prepared, model, "float32"))
    assert reader is not None
    for name, tensor in tensors.items():
        mapped = reader.take(name)
        assert mapped.dtype == torch.float32
        assert mapped.shape == tensor.shape
        expected = tensor.to(torch.float32)
        if name == "f16":  # numpy and torch may quiet a signalling NaN differently: every NaN stays a NaN
            nan = expected.isnan()
            assert torch.equal(mapped.isnan(), nan)
            assert _same_bits(mapped[~nan], expected[~nan])
        else:
            assert _same_bits(mapped, expected), name


def test_a_checkpoint_it_cannot_convert_or_read_ends_the_preparing_with_nothing_left(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    save_file({"ids": torch.arange(10), "w": torch.randn(4, 4)}, str(model / "model.safetensors"))
    prepared = tmp_path / "prepared"
    assert not _prepare(model, prepared).written
    assert list(prepared.iterdir()) == []

    save_file({"w": torch.randn(64, 64)}, str(model / "model.safetensors"))
    data = model / "model.safetensors"
    data.write_bytes(data.read_bytes()[:-100])  # cut short after its header
    assert not _prepare(model, prepared).written
    assert list(prepared.iterdir()) == []


@settings(deadline=None, max_examples=25)
@given(rows=st.integers(1, 40), columns=st.integers(1, 40), piece=st.integers(1, 2048),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_any_shape_in_any_pieces_is_written_whole(tmp_path_factory: pytest.TempPathFactory, rows: int, columns: int,
                                                  piece: int, dtype: torch.dtype) -> None:
    root = tmp_path_factory.mktemp("any")
    model = root / "model"
    model.mkdir()
    tensor = (torch.randn(rows, columns) * 100).to(dtype)
    save_file({"a": tensor, "b": tensor.t().contiguous().clone()}, str(model / "model.safetensors"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(float32_preparing, "_PIECE_BYTES", piece)
        assert _prepare(model, root / "prepared").written
    reader = PreparedReader.open(location(root / "prepared", model, "float32"))
    assert reader is not None
    assert _same_bits(reader.take("a"), tensor.float())
    assert _same_bits(reader.take("b"), tensor.t().float())
    assert math.prod(reader.entries["a"]["shape"]) == rows * columns
