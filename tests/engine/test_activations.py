"""The vision tower's MLP activation computed in place (edgevl.engine.activations): the same values as
transformers' GELU bit for bit, written into the product's output, and the loaded model's tower gives the same
features with it as with transformers' own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.activations import ACT2FN

from edgevl.engine.activations import InPlaceGELUTanh, use_in_place_vision_activation
from edgevl.engine.loading import load_model
from edgevl.engine.prompts import preprocess_image


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 33), (720, 256), (3, 5, 129)])
def test_in_place_equals_transformers_gelu_and_writes_into_its_input(dtype: torch.dtype,
                                                                     shape: tuple[int, ...]) -> None:
    torch.manual_seed(3)
    x = (torch.randn(shape) * 4).to(dtype)
    expected = ACT2FN["gelu_pytorch_tanh"](x)
    with torch.inference_mode():
        fresh = x.clone()
        out = InPlaceGELUTanh()(fresh)
    assert out.data_ptr() == fresh.data_ptr()
    assert torch.equal(out, expected)


def test_a_view_or_a_tensor_needing_gradients_is_left_as_it_is() -> None:
    base = torch.randn(8, 16)
    view = base[:, :8]
    before = base.clone()
    out = InPlaceGELUTanh()(view)
    assert torch.equal(base, before)
    assert torch.equal(out, ACT2FN["gelu_pytorch_tanh"](before[:, :8]))
    grad = torch.randn(4, 4, requires_grad=True)
    assert torch.equal(InPlaceGELUTanh()(grad), ACT2FN["gelu_pytorch_tanh"](grad))


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
def test_the_loaded_towers_features_equal_transformers_activation(test_model_dir: Path, precision: str) -> None:
    lm = load_model(str(test_model_dir), precision, 1)  # type: ignore[arg-type]
    blocks = lm.model.model.visual.blocks
    assert all(isinstance(b.mlp.act_fn, InPlaceGELUTanh) for b in blocks)
    image = Image.effect_noise((96, 64), 60).convert("RGB")
    encoded = preprocess_image(lm, image, 96 * 64)

    def features() -> list[torch.Tensor]:
        with torch.inference_mode():
            out = lm.model.model.get_image_features(encoded.pixel_values, encoded.grid_thw, return_dict=True)
        return [t.clone() for t in (*out.pooler_output, *(f for fs in out.deepstack_features for f in fs))]

    ours = features()
    for block in blocks:
        block.mlp.act_fn = ACT2FN["gelu_pytorch_tanh"]
    stock = features()
    assert len(ours) == len(stock)
    assert all(torch.equal(a, b) for a, b in zip(ours, stock, strict=True))
    # Put back, the stock activations are found and replaced again.
    assert use_in_place_vision_activation(lm.model) == len(blocks)
