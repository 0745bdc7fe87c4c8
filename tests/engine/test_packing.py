"""A later int8 start answers at once from its mapped prepared rows, packs its layers for fbgemm behind the
answers, and ends with exactly the model a start that packed them first would have."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from edgevl.engine import loading, onednn_int8, packing
from edgevl.engine.engine import Engine
from edgevl.engine.kernels import IntMatmulLinear, RowSlices, fbgemm_int8_available
from edgevl.engine.loading import load_model
from tests.harness.images import noise_image
from tests.harness.prepared import QUESTIONS, answer, mapped_ranges

pytestmark = pytest.mark.skipif(not fbgemm_int8_available(), reason="packing is for fbgemm's int8 Linear")


@pytest.fixture(autouse=True)
def _int_mm_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers from the mapped rows wait for no packing on any host here: the test model is small enough for
    ``_int_mm`` at any speed (on the 2B model only a CPU with VNNI defers its packing)."""
    monkeypatch.setattr(loading, "int_mm_fast", lambda: True)


@pytest.fixture
def prepared(tmp_path: Path, test_model_dir: Path) -> Path:
    directory = tmp_path / "prepared"
    first = load_model(str(test_model_dir), "int8", 1, directory)
    assert first.prepared == "written"
    assert first.packer is None, "the first start packs as it quantizes"
    return directory


def test_a_later_start_answers_before_packing_and_ends_as_a_start_that_packed_first(
        prepared: Path, test_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = answer(load_model(str(test_model_dir), "int8", 1))  # packed as it loads, nothing mapped
    monkeypatch.setattr(RowSlices, "ROWS", 128)  # the test model's 566-row head is packed in slices too
    gate = threading.Event()
    lm = load_model(str(test_model_dir), "int8", 1, prepared, pack_gate=gate)
    assert lm.prepared == "read"
    assert lm.packer is not None
    unpacked = [m for m in lm.model.modules() if isinstance(m, IntMatmulLinear)]
    assert len(unpacked) == lm.packer.total > 0
    assert isinstance(lm.model.lm_head, IntMatmulLinear)
    data = next(prepared.glob("*.bin"))
    assert mapped_ranges(data) > lm.packer.total, "each matrix's rows and scales are mapped, not read"

    _, early_scores = answer(lm)  # every layer still on _int_mm
    _, late_scores = reference
    assert isinstance(early_scores, dict)
    assert isinstance(late_scores, dict)
    for qid, score in late_scores.items():
        # Within int8 rounding of fbgemm's answers: the kernels quantize the activations alike.
        assert early_scores[qid] == pytest.approx(score, rel=0.1, abs=0.1), qid

    del unpacked
    gate.set()
    assert lm.packer.wait(60)
    assert lm.packer.failed is None
    assert lm.packer.packed == lm.packer.total
    assert not any(isinstance(m, IntMatmulLinear) for m in lm.model.modules())
    assert isinstance(lm.model.lm_head, RowSlices)
    assert len(lm.model.lm_head.slices) == 5
    assert answer(lm) == reference, "packed behind the answers, sliced head included: the same model"
    # What stays mapped is the embedding table's rows alone; every packed matrix's mapping is gone.
    assert mapped_ranges(data) == 1


def test_a_packing_that_fails_leaves_the_rest_answering_unpacked(prepared: Path, test_model_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = onednn_int8.packed
    calls = []

    def fails_third(*args: Any) -> torch.nn.Module:
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("no room for the packed copy")
        return real(*args)

    monkeypatch.setattr(onednn_int8, "packed", fails_third)
    lm = load_model(str(test_model_dir), "int8", 1, prepared)
    assert lm.packer is not None
    assert lm.packer.wait(60)
    assert lm.packer.packed == 2
    assert lm.packer.failed == "MemoryError: no room for the packed copy"
    assert sum(isinstance(m, IntMatmulLinear) for m in lm.model.modules()) == lm.packer.total - 2
    answered = Engine(lm).answer(noise_image(96, 80, seed=4), QUESTIONS, 96 * 96)
    assert set(answered.answers) == {"d", "c", "t"}
    assert answered.answers["c"]["value"] in ("A", "B", "C")


def test_language_model_layers_are_packed_first_then_the_head_then_the_vision_tower() -> None:
    lm = "model.language_model.layers"
    paths = ["model.visual.blocks.0.attn.qkv", "lm_head", f"{lm}.1.mlp.gate_up_proj.linear",
             "model.visual.merger.linear_fc1", f"{lm}.0.self_attn.qkv_proj.linear"]
    deferred = [packing.Deferred(p, torch.zeros(1, 1, dtype=torch.int8), torch.ones(1, dtype=torch.float64), None)
                for p in paths]
    packer = packing.Packer(torch.nn.Module(), deferred)
    assert [d.path for d in packer._deferred] == [
        f"{lm}.1.mlp.gate_up_proj.linear", f"{lm}.0.self_attn.qkv_proj.linear", "lm_head",
        "model.visual.blocks.0.attn.qkv", "model.visual.merger.linear_fc1"]


def test_a_process_that_exits_while_packing_exits_cleanly(prepared: Path, test_model_dir: Path,
                                                           tmp_path: Path) -> None:
    # The C++ runtime aborts a process that exits while fbgemm packs in another thread; the worker ends
    # its process in the middle of packing whenever it is stopped soon after a start.
    script = tmp_path / "exit_while_packing.py"
    script.write_text(
        "import sys, threading\n"
        "from pathlib import Path\n"
        "from edgevl.engine import loading\n"
        "from edgevl.engine.loading import load_model\n"
        "loading.int_mm_fast = lambda: True\n"
        "gate = threading.Event()\n"
        f"lm = load_model({str(test_model_dir)!r}, 'int8', 1, Path({str(prepared)!r}), pack_gate=gate)\n"
        "assert lm.packer is not None and lm.prepared == 'read'\n"
        "gate.set()\n"
        "print('exiting', flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "exiting\n"
    assert "terminate called" not in proc.stderr


def test_stopping_the_packing_leaves_the_rest_answering_unpacked(prepared: Path, test_model_dir: Path) -> None:
    gate = threading.Event()
    lm = load_model(str(test_model_dir), "int8", 1, prepared, pack_gate=gate)
    assert lm.packer is not None
    lm.packer.stop()  # before its first layer: the gate is opened for it
    assert lm.packer.done.is_set()
    assert lm.packer.packed == 0
    assert lm.packer.failed is None
    assert sum(isinstance(m, IntMatmulLinear) for m in lm.model.modules()) == lm.packer.total
    assert set(Engine(lm).answer(noise_image(96, 80, seed=4), QUESTIONS, 96 * 96).answers) == {"d", "c", "t"}


def test_where_int_mm_is_slow_a_later_start_packs_as_it_maps(prepared: Path, test_model_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Without VNNI, _int_mm ran at a tenth of fbgemm's rate: an answer from unpacked layers would come after the
    # packing anyway, so the start packs each layer from its mapped rows and is then at full speed.
    monkeypatch.setattr(loading, "int_mm_fast", lambda: False)
    reference = answer(load_model(str(test_model_dir), "int8", 1))
    lm = load_model(str(test_model_dir), "int8", 1, prepared)
    assert lm.prepared == "read"
    assert lm.packer is None
    assert not any(isinstance(m, IntMatmulLinear) for m in lm.model.modules())
    assert answer(lm) == reference


def test_the_answers_leave_the_packer_a_core_until_it_is_done(prepared: Path, test_model_dir: Path) -> None:
    """Two threads answering beside a packing thread on two cores would make every parallel step wait for the
    one that shares its core: while packing runs, the passes use one thread fewer, then all again."""
    gate = threading.Event()
    lm = load_model(str(test_model_dir), "int8", 2, prepared, pack_gate=gate)
    assert lm.packer is not None
    assert lm.threads == 2
    seen: list[int] = []
    hooks = [module.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
             for module in (lm.model.model.visual, lm.model.model.language_model)]
    answer(lm)
    assert seen
    assert set(seen) == {1}
    gate.set()
    assert lm.packer.wait(60)
    seen.clear()
    answer(lm)
    assert set(seen) == {2}
    for hook in hooks:
        hook.remove()
    assert packing.answer_threads(None, 1) == 1
    assert packing.answer_threads(lm.packer, 1) == 1
