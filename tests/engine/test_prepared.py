"""int8, int4 and float32 weights prepared once: read back at the next start with the very same answers, made again
when the model changes or the file is damaged, and never a reason for a start to fail."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevl.engine import loading, onednn_int8
from edgevl.engine import prepared as prepared_module
from edgevl.engine.engine import Engine
from edgevl.engine.int8_layers import Int8Rows, beside_int4_groups
from edgevl.engine.kernels import FbgemmLinear, Int8Embedding, IntMatmulLinear, fbgemm_int8_available
from edgevl.engine.loading import load_model
from edgevl.questions import Question
from tests.harness.disks import fill
from tests.harness.images import noise_image
from tests.harness.prepared import mapped_ranges

QUESTIONS = [
    Question(id="d", ask="Is there a defect?", type="yes_no"),
    Question(id="c", ask="Which type?", type="choice", options=("A", "B")),
    Question(id="t", ask="Read the label.", max_tokens=8),
]


def _answers(model_dir: Path, prepared_dir: Path | None, precision: str = "int8") -> tuple[str, object]:
    lm = load_model(str(model_dir), precision, 1, prepared_dir)  # type: ignore[arg-type]
    state = lm.prepared
    if lm.preparer is not None:  # float32 writes its prepared weights behind its answers
        assert state == "preparing"
        assert lm.preparer.wait(60)
        state = lm.preparer.outcome
    if lm.packer is not None:  # answers compared exactly: those of the model at full speed
        assert lm.packer.wait(60)
        assert lm.packer.failed is None
    answered = Engine(lm).answer(noise_image(96, 80, seed=3), QUESTIONS, 96 * 96)
    return state, (answered.tokens, answered.scores)


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _model_of(precision: str, request: pytest.FixtureRequest) -> Path:
    """The test model, or for int4 the one whose layers have whole int4 groups (else int4 would be int8's file)."""
    return Path(request.getfixturevalue("grouped_model_dir" if precision == "int4" else "test_model_dir"))


@pytest.mark.parametrize("precision", ["int8", "float32", "int4"])
def test_written_read_and_rebuilt_with_the_answers_of_a_load_without_them(tmp_path: Path, precision: str,
                                                                           request: pytest.FixtureRequest) -> None:
    test_model_dir = _model_of(precision, request)
    prepared = tmp_path / "prepared"
    _, plain = _answers(test_model_dir, None, precision)
    assert _answers(test_model_dir, prepared, precision) == ("written", plain)
    names = _files(prepared)
    assert [n.rsplit(".", 1)[1] for n in names] == ["bin", "json"]
    assert names[0].startswith(f"{precision}-")
    if precision == "int4":  # the decoder layers' four-bit groups beside their int8 rows
        tensors = json.loads((prepared / names[1]).read_text())["tensors"]
        kinds = {field: {t["dtype"] for name, t in tensors.items() if name.endswith(f".int4.{field}")}
                 for field in ("packed", "steps", "scales")}
        assert kinds == {"packed": {"uint8"}, "steps": {"int8"}, "scales": {"float32"}}
        assert len([name for name in tensors if name.endswith(".int4.packed")]) == 8
    assert _answers(test_model_dir, prepared, precision) == ("read", plain)

    data = next(prepared.glob("*.bin"))
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 3] ^= 0x10
    data.write_bytes(damaged)
    assert _answers(test_model_dir, prepared, precision) == ("written", plain), "made again, not trusted"
    assert _files(prepared) == names
    assert _answers(test_model_dir, prepared, precision) == ("read", plain)

    data.write_bytes(data.read_bytes()[: len(damaged) // 2])  # cut short: its index names bytes it lacks
    assert _answers(test_model_dir, prepared, precision) == ("written", plain), "made again, not trusted"
    assert _answers(test_model_dir, prepared, precision) == ("read", plain)


def test_a_start_killed_while_preparing_leaves_nothing_that_is_read(tmp_path: Path, test_model_dir: Path) -> None:
    prepared = tmp_path / "prepared"
    _answers(test_model_dir, prepared)
    index = next(prepared.glob("*.json"))
    index.unlink()  # the index is written last: without it the data is not complete
    (prepared / (index.stem + ".bin.partial")).write_bytes(b"half")
    assert _answers(test_model_dir, prepared)[0] == "written"
    assert not list(prepared.glob("*.partial"))


def test_a_changed_model_gets_its_own_prepared_weights_and_the_old_ones_go(tmp_path: Path,
                                                                          test_model_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(test_model_dir, model)
    prepared = tmp_path / "prepared"
    _answers(model, prepared)
    before = _files(prepared)
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # replaced in place
    assert _answers(model, prepared)[0] == "written"
    after = _files(prepared)
    assert len(after) == 2
    assert set(after).isdisjoint(before)


@pytest.mark.parametrize("precision", ["int8", "float32"])
def test_a_disk_that_fills_while_preparing_costs_the_preparing_not_the_start(
        small_tmpfs: Path, test_model_dir: Path, monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    monkeypatch.setattr(loading, "room_for", lambda directory, size: True)  # the disk fills after the check
    prepared = small_tmpfs / "prepared"
    prepared.mkdir()
    fill(small_tmpfs)
    state, answers = _answers(test_model_dir, prepared, precision)
    assert state == "none"
    assert answers == _answers(test_model_dir, None, precision)[1]
    assert not list(prepared.iterdir()), "no partial file left behind"


def test_no_file_is_prepared_that_would_leave_its_disk_short_of_room(
        small_tmpfs: Path, test_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A 1 MiB file system is short of the GiB kept free for the daemon's spool and results, whatever the size.
    prepared = small_tmpfs / "prepared"
    assert not prepared_module.room_for(prepared, 1)
    assert prepared_module.room_for(Path(os.sep) / "nonexistent" / "prepared", 0) == prepared_module.room_for(
        Path(os.sep), 0), "a folder not made yet is judged by the file system it would be made on"
    state, answers = _answers(test_model_dir, prepared, "float32")
    assert state == "none"
    assert answers == _answers(test_model_dir, None, "float32")[1]
    assert not prepared.exists()
    assert "not preparing" in caplog.text


def test_bfloat16_is_not_prepared(tmp_path: Path, test_model_dir: Path) -> None:
    lm = load_model(str(test_model_dir), "bfloat16", 1, tmp_path / "prepared")
    assert lm.prepared == "none"
    assert not (tmp_path / "prepared").exists()


def test_a_file_system_that_cannot_map_files_has_the_prepared_weights_read(tmp_path: Path, test_model_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    prepared_dir = tmp_path / "prepared"
    state, plain = _answers(test_model_dir, prepared_dir)
    assert state == "written"

    def no_mapping(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(prepared_module.np, "memmap", no_mapping)
    assert _answers(test_model_dir, prepared_dir) == ("read", plain)
    data = next(prepared_dir.glob("*.bin"))
    assert mapped_ranges(data) == 0


_PRISTINE: dict[str, tuple[Path, object]] = {}  # precision: its prepared folder as first written, and the answers


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None, max_examples=20)
@given(precision=st.sampled_from(["int8", "float32", "int4"]), where=st.floats(0, 1, exclude_max=True),
       flip=st.integers(1, 255), cut=st.booleans())
def test_any_damage_to_the_prepared_file_is_rebuilt_or_changes_nothing(tmp_path_factory: pytest.TempPathFactory,
                                                                     request: pytest.FixtureRequest, precision: str,
                                                                     where: float, flip: int, cut: bool) -> None:
    test_model_dir = _model_of(precision, request)
    if precision not in _PRISTINE:  # written once per precision; every example damages a copy of it
        pristine = tmp_path_factory.mktemp(f"pristine-{precision}")
        _PRISTINE[precision] = (pristine, _answers(test_model_dir, pristine, precision)[1])
    pristine, plain = _PRISTINE[precision]
    prepared_dir = tmp_path_factory.mktemp("prepared") / "prepared"
    shutil.copytree(pristine, prepared_dir)
    data = next(prepared_dir.glob("*.bin"))
    damaged = bytearray(data.read_bytes())
    at = int(where * len(damaged))
    if cut:
        del damaged[at:]
    else:
        damaged[at] ^= flip
    data.write_bytes(damaged)
    tensors = json.loads(next(prepared_dir.glob("*.json")).read_text())["tensors"]
    if precision == "int4" and not onednn_int8.pays():  # int4 alone never reads its layers' int8 rows
        tensors = {name: t for name, t in tensors.items() if not beside_int4_groups(name, tensors)}
    sizes = {"int8": 1, "uint8": 1, "float32": 4, "float64": 8}
    in_a_tensor = any(t["offset"] <= at < t["offset"] + sizes[t["dtype"]] * math.prod(t["shape"])
                      for t in tensors.values())
    # A damaged tensor is never used: the start makes the file again.  A byte of the padding between
    # tensors, or of a tensor this start does not read, is in none it uses: the start reads the file as it is.
    assert _answers(test_model_dir, prepared_dir, precision) == ("written" if cut or in_a_tensor else "read", plain)
    assert _answers(test_model_dir, prepared_dir, precision) == ("read", plain)


def test_a_later_start_packs_the_tied_head_in_a_loading_thread_beside_the_layers(
        tmp_path: Path, test_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = tmp_path / "prepared"
    _, plain = _answers(test_model_dir, prepared)  # written: the embedding is quantized once the file is read
    calls: list[tuple[str, bool]] = []
    pack = Int8Rows.pack_tied_head

    def recorded(self: Int8Rows) -> None:
        pack(self)
        calls.append((threading.current_thread().name, self.tied_head is not None))

    monkeypatch.setattr(Int8Rows, "pack_tied_head", recorded)
    lm = load_model(str(test_model_dir), "int8", 1, prepared)
    assert lm.prepared == "read"
    [(thread, packed)] = calls
    assert thread != threading.main_thread().name, "packed by a loading thread"
    assert packed, "from the prepared rows"
    head, embedding = lm.model.lm_head, lm.model.model.language_model.embed_tokens
    assert isinstance(embedding, Int8Embedding)
    if lm.packer is None:  # packed at load: fbgemm's kernel on the embedding's own rows
        assert isinstance(head, FbgemmLinear if fbgemm_int8_available() else IntMatmulLinear)
    else:
        assert lm.packer.wait(60)
        assert lm.packer.failed is None
    answered = Engine(lm).answer(noise_image(96, 80, seed=3), QUESTIONS, 96 * 96)
    assert (answered.tokens, answered.scores) == plain
