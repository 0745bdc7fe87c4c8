"""Loading: every precision through the one code path, clear errors, never two copies of the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from edgevl.engine import loading, onednn_int8
from edgevl.engine.engine import Engine
from edgevl.engine.float32_packing import PackedLinear
from edgevl.engine.kernels import FbgemmLinear, Int8Embedding
from edgevl.engine.loading import load_model
from edgevl.engine.model_files import resolve_model_path
from edgevl.errors import ModelError
from edgevl.questions import Question
from tests.harness.images import noise_image

QUESTIONS = [
    Question(id="d", ask="Is there a defect?", type="yes_no"),
    Question(id="c", ask="Which type?", type="choice", options=("A", "B")),
    Question(id="t", ask="Read the label.", max_tokens=6),
]


def test_float32_packs_its_weights_for_onednn_only_where_that_pays(test_model_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    answers = []
    for pays, kind in ((True, PackedLinear), (False, nn.Linear)):
        monkeypatch.setattr(loading, "packing_pays", lambda config, pays=pays: pays)
        lm = load_model(str(test_model_dir), "float32")
        assert type(lm.model.model.language_model.layers[0].mlp.gate_proj) is kind
        assert type(lm.model.model.visual.blocks[0].attn.qkv) is kind
        # the tied output head shares the embedding matrix instead of a packed copy
        assert lm.model.lm_head.weight is lm.model.model.language_model.embed_tokens.weight
        answers.append(Engine(lm).answer(noise_image(96, 96, seed=6), QUESTIONS, 96 * 96))
    packed, dense = answers
    # The same float32 products and sums, in an order of each kernel's own: equal up to the last bits.
    assert packed.tokens == dense.tokens
    assert packed.scores.keys() == dense.scores.keys()
    for key in packed.scores:
        assert packed.scores[key] == pytest.approx(dense.scores[key], abs=1e-4), key


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_other_precisions_answer(test_model_dir: Path, fp32_model, precision: str) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(str(test_model_dir), precision)  # type: ignore[arg-type]
    if precision == "int8":
        assert isinstance(lm.model.lm_head, FbgemmLinear)
        o_proj = lm.model.model.language_model.layers[1].self_attn.o_proj
        # With AMX, fbgemm's beside oneDNN's prefill copy (tests/engine/test_onednn_int8.py).
        assert isinstance(o_proj.few if onednn_int8.pays() else o_proj, FbgemmLinear)
        embedding = lm.model.model.language_model.embed_tokens
        assert isinstance(embedding, Int8Embedding)
        assert embedding.qweight.dtype == torch.int8
        # the int8 rows stay within half a quantization step (plus the bfloat16
        # rounding of the row read for quantization) of the float32 embedding
        reference = fp32_model.model.model.language_model.embed_tokens.weight
        ids = torch.arange(reference.shape[0])
        bound = embedding.scales / 2 + reference.abs() * 2**-8 + 1e-6
        assert bool(((embedding(ids) - reference).abs() <= bound).all())
    else:
        assert lm.model.model.language_model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    image = noise_image(96, 96, seed=5)
    answered = Engine(lm).answer(image, QUESTIONS, 96 * 96)
    reference = Engine(fp32_model).answer(image, QUESTIONS, 96 * 96)
    assert answered.answers["c"]["value"] in ("A", "B")
    assert 0.5 <= answered.answers["d"]["confidence"] <= 1.0
    assert len(answered.tokens["t"]) >= 1
    # the same model in another precision stays close to float32
    assert answered.answers["d"]["p_yes"] == pytest.approx(reference.answers["d"]["p_yes"], abs=0.15)


def test_missing_repo_names_the_pull_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        resolve_model_path("nobody/absent-model")
    assert err.value.code == "model_missing"
    assert "edgevl model pull nobody/absent-model" in err.value.message


def test_missing_directory_and_non_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model_path(str(tmp_path))


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest, with a model
# loaded) across exec, which would hide the child's own peak.
_MEASURE = """
import json, sys
import torch, transformers  # baseline: the libraries themselves
from edgevl.engine.loading import load_model
from edgevl.worker.memcap import own_peak_bytes
base = own_peak_bytes("VmHWM")
lm = load_model(sys.argv[1], sys.argv[2], prefill_copy=sys.argv[3] == "copy")
print(json.dumps({"base": base, "peak": own_peak_bytes("VmHWM")}))
"""


@pytest.fixture(scope="module")
def medium_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~0.6 GB of float32 weights: large enough that a second copy would show in the peak RSS."""
    from edgevl.bench.checkpoints import Shapes, build_checkpoint

    shapes = Shapes(hidden=1024, layers=8, intermediate=3072, heads=8, kv_heads=4, head_dim=128, vocab=32000,
                    mrope_section=(24, 20, 20), vision_depth=2, vision_hidden=256, vision_intermediate=512,
                    vision_heads=4, deepstack=(0,))
    return build_checkpoint(tmp_path_factory.mktemp("medium"), shapes)


# Two copies would be 2x the file in float32 and at least 1x in int8; the margins leave room for the
# layer being converted and the allocator's slack, not for a second copy.  The lower bounds make sure
# the child's own peak was measured.  int8's prefill copy (a CPU with AMX) is the decoder layers' rows
# once more, by design: 0.18x this file.
@pytest.mark.parametrize(("precision", "copy", "min_fraction", "max_fraction"),
                         [("float32", "", 0.9, 1.4), ("int8", "", 0.2, 0.75), ("int8", "copy", 0.2, 0.95)])
def test_loading_never_holds_two_copies(medium_checkpoint: Path, precision: str, copy: str, min_fraction: float,
                                        max_fraction: float) -> None:
    weights = sum(f.stat().st_size for f in medium_checkpoint.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(medium_checkpoint), precision, copy or "none"],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    grown = measured["peak"] - measured["base"]
    assert grown < max_fraction * weights, f"{precision}: peak grew {grown / 1e6:.0f} MB for {weights / 1e6:.0f} MB"
    assert grown > min_fraction * weights, f"{precision}: the measurement saw only {grown / 1e6:.0f} MB"


def _copy_but_weights(model_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """Copies the model's files except its weights to ``out``; returns the weights, for the test to write there."""
    from safetensors.torch import load_file

    for item in model_dir.iterdir():
        if item.name != "model.safetensors":
            (out / item.name).write_bytes(item.read_bytes())
    return load_file(str(model_dir / "model.safetensors"))


def test_float32_layers_loaded_in_parallel_each_hold_their_own_weights(test_model_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Layers are read one per core into per-thread scratch buffers and reordered from there: every packed
    # weight must be its own, even with each layer's tensors spread over two shards.
    from safetensors.torch import save_file

    monkeypatch.setattr(loading, "packing_pays", lambda config: True)  # the scratch serves the reorder alone

    tensors = _copy_but_weights(test_model_dir, tmp_path)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[0::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({key: tensors[key] for key in keys}, str(tmp_path / file), metadata={"format": "pt"})
    weight_map = {key: file for file, keys in shards.items() for key in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    lm = load_model(str(tmp_path), "float32")
    packed = {name: m for name, m in lm.model.named_modules() if isinstance(m, PackedLinear)}
    linears = [key for key, t in tensors.items() if key.endswith(".weight") and t.dim() == 2
               and "embed" not in key]
    assert sorted(f"{name}.weight" for name in packed) == sorted(linears)
    for name, module in packed.items():
        assert torch.equal(module.packed.to_dense(), tensors[f"{name}.weight"].float()), name
        bias = tensors.get(f"{name}.bias")
        assert (module.bias is None) == (bias is None), name
        assert bias is None or torch.equal(module.bias, bias.float()), name


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_a_weight_of_the_wrong_shape_is_named(test_model_dir: Path, tmp_path: Path, precision: str) -> None:
    from safetensors.torch import save_file

    tensors = _copy_but_weights(test_model_dir, tmp_path)
    key = "model.language_model.layers.1.mlp.down_proj.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=rf"checkpoint tensor {key} has shape") as caught:
        load_model(str(tmp_path), precision)  # type: ignore[arg-type]
    assert caught.value.code == "model_unsupported"
