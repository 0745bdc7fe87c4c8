"""The int8 kernels: fbgemm's where this torch has it, the weight-only fallback where it does not."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from edgevl.engine import kernels
from edgevl.engine.engine import Engine
from edgevl.engine.kernels import IntMatmulLinear, fbgemm_int8_available, int8_linear, quantize_rows
from edgevl.engine.loading import load_model
from edgevl.engine.onednn_int8 import ByRows
from edgevl.questions import Question
from tests.harness.images import noise_image


def test_the_rows_are_those_torch_quantize_per_channel_gives() -> None:
    torch.manual_seed(0)
    weight = torch.randn(9000, 300) * 0.05  # more rows than one chunk
    q, scales = quantize_rows(weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in torch, which is why edgevl no longer uses it
        reference = torch.quantize_per_channel(weight, scales, torch.zeros(9000, dtype=torch.int64), 0,
                                               torch.qint8).int_repr()
    assert torch.equal(q, reference)


@pytest.mark.skipif(not fbgemm_int8_available(), reason="fbgemm's int8 Linear")
@pytest.mark.parametrize("shape", [(1, 1, 256), (1, 7, 256), (2, 5, 256), (300, 256)])
@pytest.mark.parametrize("bias", [True, False])
def test_fbgemm_linear_is_torch_aos_dynamic_linear_bit_for_bit(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(len(shape) + shape[-2])
    linear = torch.nn.Linear(256, 96, bias=bias)
    q, scales = quantize_rows(linear.weight.detach())
    b = linear.bias.detach() if bias else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch announces the module's move to torchao
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

        reference = DynamicQuantLinear(256, 96, bias_=bias, dtype=torch.qint8)  # type: ignore[no-untyped-call]
    reference.set_weight_bias(kernels._per_channel_qint8(q, scales), b)
    lean = kernels.fbgemm_linear(q, scales, b)
    assert isinstance(lean, kernels.FbgemmLinear)
    x = torch.randn(shape) * 3
    with torch.inference_mode():
        expected, got = reference(x), lean(x)
    assert got.shape == expected.shape == (*shape[:-1], 96)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_the_fallback_computes_what_fbgemm_computes(rows: int) -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 96)
    fallback = int8_linear(linear, fbgemm=False)
    assert isinstance(fallback, IntMatmulLinear)
    x = torch.randn(2, rows, 256)
    exact = linear(x)
    with torch.inference_mode():
        got = fallback(x)
    q, scales = quantize_rows(linear.weight.detach())
    # The same arithmetic spelled out: activations to int8 per row, an exact integer product, both scales.
    flat = x.reshape(-1, 256)
    step = (flat.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    xq = torch.round(flat * (1.0 / step)).clamp(-128, 127)
    spelled = ((xq.double() @ q.double().T) * step.double() * scales.unsqueeze(0)).float() + linear.bias
    assert got.shape == exact.shape
    assert torch.allclose(got.reshape(-1, 96), spelled, atol=1e-4)
    if fbgemm_int8_available():
        with torch.inference_mode():
            fast = int8_linear(linear, fbgemm=True)(x)
        # fbgemm also quantizes the activations: both stay within int8 rounding of the float32 result.
        scale = exact.abs().max()
        assert (fast - exact).abs().max() < 0.05 * scale
        assert (got - exact).abs().max() < 0.05 * scale


def test_int8_answers_where_torch_has_no_fbgemm_linear(test_model_dir: Path, fp32_model,  # type: ignore[no-untyped-def]
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "fbgemm_int8_available", lambda: False)
    lm = load_model(str(test_model_dir), "int8")
    layers = lm.model.model.language_model.layers

    def decoding(kernel: torch.nn.Module) -> torch.nn.Module:  # beside oneDNN's prefill copy, with AMX
        return kernel.few if isinstance(kernel, ByRows) else kernel

    assert isinstance(decoding(layers[0].mlp.gate_up_proj.linear), IntMatmulLinear)
    assert isinstance(decoding(layers[0].self_attn.o_proj), IntMatmulLinear)
    assert isinstance(lm.model.lm_head, IntMatmulLinear)
    questions = [Question(id="d", ask="Is there a defect?", type="yes_no"),
                 Question(id="t", ask="Read the label.", max_tokens=4)]
    image = noise_image(96, 96, seed=5)
    answered = Engine(lm).answer(image, questions, 96 * 96)
    reference = Engine(fp32_model).answer(image, questions, 96 * 96)
    assert answered.answers["d"]["p_yes"] == pytest.approx(reference.answers["d"]["p_yes"], abs=0.15)
    assert len(answered.tokens["t"]) >= 1


@pytest.mark.parametrize("rows", [1, 8, 16, 300])
def test_the_chunked_head_computes_what_one_product_computes_bit_for_bit(rows: int) -> None:
    torch.manual_seed(rows)
    linear = torch.nn.Linear(256, 3 * kernels.ChunkedLinear.CHUNK + 123, bias=False)  # a partial last slice
    chunked = kernels.ChunkedLinear(linear)
    assert chunked.weight is linear.weight, "the tied weight is shared, never copied"
    x = torch.randn(rows, 256)
    with torch.inference_mode():
        assert torch.equal(chunked(x), linear(x))


@pytest.mark.parametrize("shape", [(2, 256), (8, 256), (3, 5, 256), (1, 1, 256), (300, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_transposed_head_computes_the_same_products(shape: tuple[int, ...], bias: bool) -> None:
    # Weights times the rows' transpose: the same products per output, summed in an order of the BLAS's own.
    torch.manual_seed(len(shape) + shape[0])
    linear = torch.nn.Linear(256, 2 * kernels.ChunkedLinear.CHUNK + 77, bias=bias)
    head = kernels.ChunkedLinear(linear, transposed=True)
    assert head.weight is linear.weight, "the tied weight is shared, never copied"
    x = torch.randn(shape)
    with torch.inference_mode():
        out, expected = head(x), linear(x)
    assert out.shape == expected.shape
    assert out.is_contiguous()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_a_tied_float32_head_is_chunked_and_stays_the_embedding(fp32_model) -> None:  # type: ignore[no-untyped-def]
    model = fp32_model.model
    assert isinstance(model.lm_head, kernels.ChunkedLinear)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


@pytest.mark.skipif(not fbgemm_int8_available(), reason="slices are of fbgemm's int8 Linear")
@pytest.mark.parametrize("rows", [1, 6, 300])
def test_a_head_packed_in_slices_computes_what_one_packed_matrix_computes(rows: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    q, scales = quantize_rows(torch.randn(1000, 128) * 0.05)
    whole = kernels.fbgemm_linear(q, scales, None)
    monkeypatch.setattr(kernels.RowSlices, "ROWS", 256)
    sliced = kernels.fbgemm_linear(q, scales, None)
    assert isinstance(sliced, kernels.RowSlices)
    assert len(sliced.slices) == 4
    x = torch.randn(rows, 128) * 3
    with torch.inference_mode():
        assert torch.equal(sliced(x), whole(x)), "bit for bit: each output channel is computed alike"
