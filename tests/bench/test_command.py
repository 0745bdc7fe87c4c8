"""``edgevl bench`` end to end on the test model: every figure measured, the document written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgevl.bench.kernels import int4_verdict, read_rate, weight_bytes

pytestmark = pytest.mark.slow


def test_bench_reports_w4_wdoc_and_ready_and_writes_the_document(tmp_path: Path, test_model_dir: Path) -> None:
    checkpoint = tmp_path / "model"
    shutil.copytree(test_model_dir, checkpoint)  # the bench keeps its trained tokenizer beside the checkpoint
    doc = tmp_path / "performance.md"
    proc = subprocess.run([sys.executable, "-m", "edgevl", "bench", "--checkpoint", str(checkpoint), "--precision",
                           "float32", "--json", "--write-doc", str(doc), "--threads", "1"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    (result,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert result["workload"] == "W4"
    assert result["precision"] == "float32"
    for key in ("seconds_per_image", "wdoc_seconds_per_page", "ready_seconds", "decode_seconds_per_token",
                "w4x8_frames_per_minute", "w4x8_speedup", "floor_seconds_per_image", "wdoc_floor_seconds_per_page"):
        assert result[key] > 0, key
    assert result["ready_seconds"] < 120
    # A standby made the imports before it was needed: its takeover is ready sooner than a start.
    assert 0 <= result["standby_ready_seconds"] < result["ready_seconds"]
    # A floor counts the products alone: always below the measured time.
    assert result["floor_seconds_per_image"] < result["seconds_per_image"]
    assert result["wdoc_floor_seconds_per_page"] < result["wdoc_seconds_per_page"]
    assert result["peak_rss_bytes"] > 50e6
    text = doc.read_text()
    # float32 frames answered together are token-identical to each alone: the bench checks it on W4's frames.
    assert "x | 5 of 5 frames |" in text
    for section in ("| float32 |", "## W4x8: a burst (the stream mode)", "## W-doc: a document page", "## Floors",
                    "## Targets", "| W4x8 speedup | float32 |",
                    "| ready s, a standby taking over a lost worker | float32 |",
                    "## Memory", "## Kernels", "## Answers held to a schema", "| 151,646 |"):
        assert section in text, section
    # The kernels are timed on the checkpoint's own gate and up shape (the test model's: 64 inputs, no int4 groups).
    assert "GFLOP/s of one 64x128 projection (the checkpoint's gate and up shape" in text
    assert "The engine's int4 kernel was not measured here (a 64x128 matrix has no whole groups of 128)." in text
    (work,) = [line for line in text.splitlines() if line.startswith("A start's work on its weights, one thread:")]
    assert "fresh memory made resident at" in work
    assert (tmp_path / "qwen-sized-tokenizer.json").is_file()


def test_the_int4_verdict_sets_each_kernels_decode_read_against_the_memory() -> None:
    # As measured on a host whose 260 MB cache held the bench's int8 matrices: fbgemm read one row at 45 GB/s,
    # a sum over 1 GiB at 27, torch's int4 kernel at 16 (its arithmetic); the engine's int4 kernel near the memory.
    kernels = {"int8_m1": 90.6, "int8_m8": 400.0, "int4_torch_m1": 61.8, "int4_torch_m8": 100.0, "int4_m1": 95.0,
               "int4_m8": 300.0, "read_gbs": 26.7}
    assert read_rate(kernels, "int8") > kernels["read_gbs"] > read_rate(kernels, "int4_torch")
    ours, torchs = int4_verdict(kernels)
    assert ours.startswith("The engine's int4 kernel (`int4`) against int8 (`int8`), same run: 1.05x the one-row rate,"
                           " 0.75x the eight-row rate")
    # Each read no faster than the memory: int4's half bytes at its own read (below the memory's), int8's at the
    # memory's.
    assert read_rate(kernels, "int4") < 26.7
    ratio = (weight_bytes("int4") / read_rate(kernels, "int4")) / (weight_bytes("int8") / 26.7)
    assert ratio < 0.62
    assert f"take {ratio:.2f}x int8's time" in ours
    ratio = (weight_bytes("int4_torch") / read_rate(kernels, "int4_torch")) / (weight_bytes("int8") / 26.7)
    assert 0.62 < ratio < 1
    assert f"take {ratio:.2f}x int8's time" in torchs
    # Where int8's kernel reads below the memory, it is taken at its own read.
    int8_read = read_rate({"int8_m1": 40.0}, "int8")
    assert int8_read < kernels["read_gbs"]
    ratio = (weight_bytes("int4_torch") / read_rate(kernels, "int4_torch")) / (weight_bytes("int8") / int8_read)
    assert f"take {ratio:.2f}x int8's time" in int4_verdict({**kernels, "int8_m1": 40.0})[1]
    # Without a C compiler the engine's kernel is not measured, and the verdict says so.
    del kernels["int4_m1"], kernels["int4_m8"]
    assert int4_verdict(kernels)[0] == "The engine's int4 kernel was not measured here (no C compiler)."
