"""The vision tower's patch embedding as one matrix product (edgevl.engine.patches): the convolution's outputs to
float32's rounding, for int8 and int4 loads (prepared or not); float32 keeps the convolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgevl.engine.engine import Engine
from edgevl.engine.loading import load_model
from edgevl.engine.patches import MatrixPatchEmbed, use_matrix_patch_embedding
from edgevl.questions import Question
from tests.harness.images import noise_image


@settings(max_examples=30, deadline=None)
@given(channels=st.integers(1, 3), frames=st.integers(1, 2), size=st.integers(1, 6), out=st.integers(1, 9),
       patches=st.integers(0, 20), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_the_matrix_is_the_convolution_to_float32_rounding(channels: int, frames: int, size: int, out: int,
                                                          patches: int, bias: bool, seed: int) -> None:
    torch.manual_seed(seed)
    kernel = (frames, size, size)
    conv = nn.Conv3d(channels, out, kernel_size=kernel, stride=kernel, bias=bias)
    flat = torch.randn(patches, channels * frames * size * size)
    with torch.inference_mode():
        want = conv(flat.view(-1, channels, frames, size, size)).view(-1, out)
        got = MatrixPatchEmbed(conv)(flat)
    assert got.shape == (patches, out)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_convolution_that_is_not_one_product_per_patch_is_kept() -> None:
    class Visual(nn.Module):
        def __init__(self, conv: nn.Conv3d) -> None:
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.proj = conv

    class Model(nn.Module):
        def __init__(self, conv: nn.Conv3d) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.visual = Visual(conv)

    overlapping = Model(nn.Conv3d(3, 4, kernel_size=(2, 4, 4), stride=(2, 2, 2)))
    assert not use_matrix_patch_embedding(overlapping)
    assert isinstance(overlapping.model.visual.patch_embed.proj, nn.Conv3d)
    padded = Model(nn.Conv3d(3, 4, kernel_size=(2, 4, 4), stride=(2, 4, 4), padding=(0, 1, 1)))
    assert not use_matrix_patch_embedding(padded)
    whole = Model(nn.Conv3d(3, 4, kernel_size=(2, 4, 4), stride=(2, 4, 4)))
    assert use_matrix_patch_embedding(whole)
    assert isinstance(whole.model.visual.patch_embed, MatrixPatchEmbed)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_int8_and_int4_loads_embed_patches_as_one_product_and_answer(test_model_dir: Path, tmp_path: Path,
                                                                     precision: str) -> None:
    stock = load_model(str(test_model_dir), "float32", 1)
    conv = stock.model.model.visual.patch_embed
    assert isinstance(conv.proj, nn.Conv3d), "float32 keeps the convolution: token-identical to generate()"
    for prepared in (None, tmp_path / "prepared", tmp_path / "prepared"):  # the first start prepares, the second maps
        lm = load_model(str(test_model_dir), precision, 1, prepared)  # type: ignore[arg-type]
        embed = lm.model.model.visual.patch_embed
        assert isinstance(embed, MatrixPatchEmbed)
        pixels = torch.randn(7, embed.weight.shape[1])
        with torch.inference_mode():
            torch.testing.assert_close(embed(pixels), conv(pixels), rtol=1e-5, atol=1e-5)
        answered = Engine(lm).answer(noise_image(96, 80, seed=3), [Question(id="d", ask="A defect?", type="yes_no")],
                                     96 * 96)
        assert answered.answers["d"]["value"] in (True, False)
