"""A later float32 start maps its prepared weights instead of converting the checkpoint into fresh memory; where its
trial chose oneDNN's packed kernel, it answers at once with ``F.linear`` on the mapped weights and packs them
behind the answers, ending with exactly the model a start that packed them as it loaded would have."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from edgevl.engine import loading
from edgevl.engine.float32_packing import PackedLinear, packing_available
from edgevl.engine.float32_preparing import Preparer
from edgevl.engine.loading import load_model
from tests.harness.prepared import answer, mapped_ranges


def _prepare(model_dir: Path, prepared: Path) -> None:
    first = load_model(str(model_dir), "float32", 1, prepared)
    assert first.preparer is not None
    assert first.preparer.wait(60)
    assert first.preparer.written


def _packs(monkeypatch: pytest.MonkeyPatch, packs: bool) -> None:
    # The test model fits in any cache, where no trial chooses packing: its outcome is set here.
    monkeypatch.setattr(loading, "packing_pays", lambda config: packs)


@pytest.mark.skipif(not packing_available(), reason="packing is for oneDNN's float32 kernel")
def test_a_later_start_answers_on_its_mapped_weights_and_ends_as_a_start_that_packed_first(
        tmp_path: Path, test_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _packs(monkeypatch, False)
    dense = answer(load_model(str(test_model_dir), "float32", 1))
    _packs(monkeypatch, True)
    packed = answer(load_model(str(test_model_dir), "float32", 1))  # packed as it loads, nothing mapped
    prepared = tmp_path / "prepared"
    first = load_model(str(test_model_dir), "float32", 1, prepared)
    assert first.prepared == "preparing"
    assert first.packer is None, "the first start packs as it reads"
    assert first.preparer is not None
    assert first.preparer.wait(60)
    assert first.preparer.written
    assert answer(first) == packed
    del first

    gate = threading.Event()
    lm = load_model(str(test_model_dir), "float32", 1, prepared, pack_gate=gate)
    assert lm.prepared == "read"
    assert lm.packer is not None
    unpacked = [m for m in lm.model.modules() if type(m) is nn.Linear]
    assert len(unpacked) == lm.packer.total > 0
    assert not any(isinstance(m, PackedLinear) for m in lm.model.modules())
    data = next(prepared.glob("*.bin"))
    before = mapped_ranges(data)
    assert before > lm.packer.total, "every weight is mapped, not read"
    assert answer(lm) == dense, "F.linear on the mapped weights: the products of a start that does not pack"

    del unpacked
    gate.set()
    assert lm.packer.wait(60)
    assert lm.packer.failed is None
    assert lm.packer.packed == lm.packer.total
    assert not any(type(m) is nn.Linear for m in lm.model.modules())
    assert answer(lm) == packed, "packed behind the answers: the same model"
    # Each packed matrix's mapping, and its bias's, is gone; the norms, the embedding and the tied head's stay.
    index = json.loads(next(prepared.glob("*.json")).read_text())["tensors"]
    packed_paths = {name for name, m in lm.model.named_modules() if isinstance(m, PackedLinear)}
    kept = [key for key in index if key.rpartition(".")[0] not in packed_paths]
    assert 0 < len(kept) < len(index)
    assert mapped_ranges(data) == len(kept)


def test_a_later_start_where_packing_does_not_pay_answers_on_its_mapped_weights_for_good(
        tmp_path: Path, test_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _packs(monkeypatch, False)
    prepared = tmp_path / "prepared"
    _prepare(test_model_dir, prepared)
    lm = load_model(str(test_model_dir), "float32", 1, prepared)
    assert lm.prepared == "read"
    assert lm.packer is None
    index = json.loads(next(prepared.glob("*.json")).read_text())["tensors"]
    assert mapped_ranges(next(prepared.glob("*.bin"))) == len(index), "every tensor stays mapped"
    assert answer(lm) == answer(load_model(str(test_model_dir), "float32", 1))


def test_the_first_start_answers_while_it_prepares_and_its_answers_do_not_wait_for_the_disk(
        tmp_path: Path, test_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = answer(load_model(str(test_model_dir), "float32", 1))
    held = threading.Event()
    pieces = Preparer._pieces

    def slow_disk(self: Preparer, *args: Any) -> Iterator[torch.Tensor]:
        held.wait(60)  # the disk takes its time: nothing is written until the answer is in
        yield from pieces(self, *args)

    monkeypatch.setattr(Preparer, "_pieces", slow_disk)
    prepared = tmp_path / "prepared"
    lm = load_model(str(test_model_dir), "float32", 1, prepared)
    assert lm.preparer is not None
    assert answer(lm) == plain
    assert not lm.preparer.done.is_set()
    assert not list(prepared.glob("*.json")), "nothing complete before the writing is"
    held.set()
    assert lm.preparer.wait(60)
    assert lm.preparer.written
    assert [p.suffix for p in sorted(prepared.iterdir())] == [".bin", ".json"]


def test_a_start_stopped_while_preparing_leaves_nothing_and_the_next_prepares_anew(
        tmp_path: Path, test_model_dir: Path) -> None:
    prepared = tmp_path / "prepared"
    # A worker that exits during the writing (its atexit stop), and one killed in the middle of it (SIGKILL).
    script = tmp_path / "stopped.py"
    script.write_text(
        "import os, signal, sys, threading\n"
        "from pathlib import Path\n"
        "from edgevl.engine.float32_preparing import Preparer\n"
        "from edgevl.engine.loading import load_model\n"
        "pieces = Preparer._pieces\n"
        "def first_piece_then(self, *args):\n"
        "    for piece in pieces(self, *args):\n"
        "        yield piece\n"
        "        if sys.argv[1] == 'kill':\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        threading.Event().wait(0.2)\n"
        "Preparer._pieces = first_piece_then\n"
        f"lm = load_model({str(test_model_dir)!r}, 'float32', 1, Path({str(prepared)!r}))\n"
        "assert lm.prepared == 'preparing'\n"
        "threading.Event().wait(0.5)\n"
        "sys.exit(0)\n")
    done = subprocess.run([sys.executable, str(script), "exit"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert list(prepared.iterdir()) == [], "the writing stopped with the process, and what it wrote went"
    killed = subprocess.run([sys.executable, str(script), "kill"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name.endswith(".bin.partial") for p in prepared.iterdir()] == [True], "cut short, never complete"
    lm = load_model(str(test_model_dir), "float32", 1, prepared)
    assert lm.prepared == "preparing", "a partial file is not read"
    assert lm.preparer is not None
    assert lm.preparer.wait(60)
    assert lm.preparer.written
    assert [p.suffix for p in sorted(prepared.iterdir())] == [".bin", ".json"]
    assert load_model(str(test_model_dir), "float32", 1, prepared).prepared == "read"
