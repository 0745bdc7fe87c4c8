"""The memory estimate made before loading, for the test model and for the real 2B shapes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from edgevl.engine.model_files import read_tensor_infos
from edgevl.errors import ModelError
from edgevl.worker import footprint

GIB = 1 << 30


def _shapes_only_checkpoint(out: Path) -> Path:
    """config.json and safetensors headers (no tensor data) of Qwen3-VL-2B, from the real model class."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from edgevl.bench.checkpoints import QWEN3_VL_2B, QWEN_SPECIAL_TOKENS, qwen3_vl_config

    ids = {token: 151643 + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)}
    config = qwen3_vl_config(QWEN3_VL_2B, ids, QWEN3_VL_2B.vocab or 151936)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(config)
    header, offset = {}, 0
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding: not stored, as in the published checkpoint
            continue
        size = tensor.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    out.mkdir()
    config.save_pretrained(out)
    raw = json.dumps(header).encode()
    (out / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return out


def test_estimate_of_the_2b_shapes_covers_the_measured_peaks(tmp_path: Path) -> None:
    path = _shapes_only_checkpoint(tmp_path / "2b")
    params = sum(info.numel for info in read_tensor_infos(path))
    assert 2.0e9 < params < 2.3e9  # Qwen3-VL-2B
    fp32 = footprint.estimate(path, "float32", 8, 448 * 448)
    int8 = footprint.estimate(path, "int8", 8, 448 * 448)
    # docs/performance.md (edgevl bench, same shapes): peak RSS 9.13 GB in float32, 3.28 GB in int8; the
    # estimate covers each, within 15%.
    assert 9.13e9 <= fp32.total <= min(9.13e9 * 1.15, 10 * GIB), "and fits the default memory_limit"
    assert 3.28e9 <= int8.total <= 3.28e9 * 1.15
    assert fp32.weights == params * 4
    # int8 holds the tied output head twice (the embedding's rows and fbgemm's packed copy); the bfloat16
    # embedding read while loading is gone before the first answer, so it is not added to the answers' memory.
    embedding = 151936 * 2048
    assert int8.weights > params + embedding
    assert int8.loading == embedding * 2
    assert int8.total < int((int8.weights + int8.runtime + int8.loading + int8.kv_cache + int8.activations) * 1.05)
    bigger = footprint.estimate(path, "float32", 8, 1920 * 1080)
    assert bigger.activations > fp32.activations
    assert bigger.kv_cache > fp32.kv_cache

    message = footprint.refusal("Qwen/Qwen3-VL-2B-Instruct", "float32", fp32, 4 * GIB, int8)
    assert message.startswith("Qwen/Qwen3-VL-2B-Instruct in float32 needs ≈ 9.1 GiB (weights 7.9 GiB")
    assert message.endswith('model.memory_limit is 4.0 GiB: raise it or use precision = "int8"')
    message = footprint.refusal("Qwen/Qwen3-VL-2B-Instruct", "int8", int8, 2 * GIB, int8)
    # Its parts add up to the total: the loading's own memory where that outweighs the answers'.
    assert "(weights 2.3 GiB, while loading 594 MiB more, runtime 400 MiB)" in message
    assert message.endswith("raise it or lower model.max_pixels, model.max_batch and model.max_frames")


def test_the_stream_mode_takes_as_many_frames_as_the_cap_holds(tmp_path: Path) -> None:
    path = _shapes_only_checkpoint(tmp_path / "2b")
    one = footprint.estimate(path, "float32", 8, 448 * 448)
    eight = footprint.estimate(path, "float32", 8, 448 * 448, frames=8)
    # Each frame keeps its prefix (≈ 230 tokens, 229 KB each in float32) and brings its answers' rows; its own
    # cache with its room (≈ 480 slots) is held until the frames are joined.
    assert 0.3e9 < eight.total - one.total < 1.5e9
    assert footprint.fit_frames(path, "float32", 8, 448 * 448, eight.total, 8) == (8, eight)
    seven = footprint.estimate(path, "float32", 8, 448 * 448, frames=7)
    assert footprint.fit_frames(path, "float32", 8, 448 * 448, eight.total - 1, 8) == (7, seven)
    # One frame is refused elsewhere (the supervisor), with its footprint.
    assert footprint.fit_frames(path, "float32", 8, 448 * 448, one.total - 1, 8) == (1, one)
    # A document's pixel budget leaves room for fewer frames under the same cap.
    assert footprint.fit_frames(path, "float32", 8, 1024 * 1024, eight.total, 8)[0] < 8
    # Measured (2B shapes, W4x8, edgevl bench on an AMD EPYC): eight int8 frames, their caches holding bfloat16,
    # peaked at 3.70 GB, float32 at 9.99-10.14 GB.
    assert 3.70e9 <= footprint.estimate(path, "int8", 8, 448 * 448, frames=8).total <= 3.70e9 * 1.15
    assert 10.14e9 <= eight.total <= 9.99e9 * 1.15


def test_a_picture_weighs_as_many_frames_as_its_pixels_hold() -> None:
    model = 448 * 448
    assert [footprint.frames_of(pixels, model) for pixels in (None, 1000, model, model + 1, 4 * model)] == [
        1, 1, 1, 2, 4]


def test_estimate_of_the_test_model_is_close_to_its_use(test_model_dir: Path) -> None:
    estimate = footprint.estimate(test_model_dir, "float32", 8, 40_000)
    # The test model's worker holds about 0.4 GB resident after a job (tests/test_worker.py caps it at 640 MiB).
    assert 0.35e9 < estimate.total < 640 << 20


def test_a_broken_checkpoint_header_is_a_model_error(tmp_path: Path, test_model_dir: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((test_model_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\xff" * 8 + b"{")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        footprint.estimate(broken, "float32", 8, 40_000)


def test_the_cache_is_counted_in_the_type_and_with_the_room_the_engine_gives_it() -> None:
    import torch

    from edgevl.engine import kvcache

    for precision, computed in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("int8", torch.float32)):
        stored = kvcache.stored_dtype(precision) or computed
        assert footprint.cache_bytes(precision) == stored.itemsize
    assert footprint.CACHE_ROOM == kvcache.MIN_ROOM


@pytest.mark.parametrize(("flags", "precision", "pays"), [
    ("fpu avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8", "int8", True),
    ("fpu avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8", "float32", False),
    ("fpu avx2 avx512f avx512_vnni amx_bf16 amx_tile", "int8", False),
    ("fpu avx2 amx_int8x", "int8", False),
])
def test_the_prefill_copy_pays_where_the_cpu_has_amx_int8_tiles(tmp_path: Path, flags: str, precision: str,
                                                                 pays: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpu = f"flags\t\t: {flags}\n"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: a CPU\n{cpu}\nprocessor\t: 1\n{cpu}")
    assert footprint.prefill_copy_pays(precision, cpuinfo) is pays  # type: ignore[arg-type]
    assert footprint.prefill_copy_pays("int8", tmp_path / "missing") is False


def test_the_prefill_copy_is_counted_and_kept_only_where_it_fits_beside_the_frames(tmp_path: Path) -> None:
    path = _shapes_only_checkpoint(tmp_path / "2b")
    alone = footprint.estimate(path, "int8", 8, 448 * 448)
    copy = footprint.estimate(path, "int8", 8, 448 * 448, prefill_copy=True)
    # The 28 decoder layers' matrices once more in int8 (1.41 G weights), nothing else.
    assert 1.40e9 < copy.weights - alone.weights < 1.43e9
    assert (copy.kv_cache, copy.activations, copy.loading) == (alone.kv_cache, alone.activations, alone.loading)
    assert footprint.estimate(path, "float32", 8, 448 * 448, prefill_copy=True) == \
        footprint.estimate(path, "float32", 8, 448 * 448)

    eight = footprint.estimate(path, "int8", 8, 448 * 448, frames=8)
    eight_copy = footprint.estimate(path, "int8", 8, 448 * 448, frames=8, prefill_copy=True)
    # Room for the copy beside eight frames: kept.
    assert footprint.plan(path, "int8", 8, 448 * 448, eight_copy.total, 0, 8, True) == (8, eight_copy, True)
    # Room for eight frames without it, not with it: the frames keep their room, the copy goes.
    assert footprint.plan(path, "int8", 8, 448 * 448, eight_copy.total - 1, 0, 8, True) == (8, eight, False)
    # Frames set in the configuration: the copy only where it fits beside them.
    assert footprint.plan(path, "int8", 8, 448 * 448, copy.total, 1, 8, True) == (1, copy, True)
    assert footprint.plan(path, "int8", 8, 448 * 448, copy.total - 1, 1, 8, True) == (1, alone, False)
    # docs/performance.md (edgevl bench on a 2-core Xeon with AMX, the copy kept): int8 peaked at 4.69 GB, eight
    # frames at 5.00 GB; the estimate covers each, within 15%.
    assert 4.69e9 <= copy.total <= 4.69e9 * 1.15
    assert 5.00e9 <= eight_copy.total <= 5.00e9 * 1.15
    # Not asked for (a CPU without AMX): never counted.
    assert footprint.plan(path, "int8", 8, 448 * 448, 100 * GIB, 0, 8, False) == (8, eight, False)


def test_int4_counts_its_groups_instead_of_the_decoder_layers_int8_rows(tmp_path: Path) -> None:
    path = _shapes_only_checkpoint(tmp_path / "2b")
    int8 = footprint.estimate(path, "int8", 8, 448 * 448)
    int4 = footprint.estimate(path, "int4", 8, 448 * 448)
    # The 28 decoder layers' 1.41 G weights in four-bit groups (half a byte each, a byte's step per 128) instead
    # of int8 rows: 0.69 GB less.
    assert 0.69e9 < int8.weights - int4.weights < 0.70e9
    assert (int4.kv_cache, int4.activations, int4.loading) == (int8.kv_cache, int8.activations, int8.loading)
    # With oneDNN's prefill copy, that copy is counted for both alike.
    int8_copy = footprint.estimate(path, "int8", 8, 448 * 448, prefill_copy=True)
    int4_copy = footprint.estimate(path, "int4", 8, 448 * 448, prefill_copy=True)
    assert int8_copy.weights - int4_copy.weights == int8.weights - int4.weights
    assert footprint.prefill_copy_pays("int4", _cpuinfo(tmp_path, "fpu avx2 avx512f amx_int8")) is True


def test_int4_counts_only_the_matrices_its_kernel_takes(test_model_dir: Path, grouped_model_dir: Path) -> None:
    """The shape rule is the kernel's own: the test model's matrices of 64 inputs stay int8 (its down projections
    of 128 are int4's), the grouped model's are all int4's."""
    from edgevl.engine import int4_kernel

    counted = {}
    for directory in (test_model_dir, grouped_model_dir):
        fits = [footprint.int4_fits(info) for info in read_tensor_infos(directory)
                if len(info.shape) == 2 and info.name.startswith("model.language_model.layers.")]
        for info in read_tensor_infos(directory):
            if len(info.shape) == 2 and info.name.startswith("model.language_model.layers."):
                assert footprint.int4_fits(info) == int4_kernel.fits(*info.shape), info.name
        counted[directory] = (sum(fits), len(fits))
        assert footprint.estimate(directory, "int4", 2, 40000).weights < \
            footprint.estimate(directory, "int8", 2, 40000).weights
    assert counted[test_model_dir] == (2, 14)
    assert counted[grouped_model_dir] == (14, 14)


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n")
    return cpuinfo


def test_a_standby_fits_where_the_cap_holds_its_imports_beside_the_worker(test_model_dir: Path) -> None:
    needed = footprint.estimate(test_model_dir, "int8", 2, 40000)
    room = needed.total + int(footprint.RUNTIME_BYTES * footprint.HEADROOM)
    assert footprint.standby_fits(needed, room)
    assert not footprint.standby_fits(needed, room - 1)
