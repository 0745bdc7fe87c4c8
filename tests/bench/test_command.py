"""``edgevl bench`` end to end on the test model: every figure measured, the document written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    (work,) = [line for line in text.splitlines() if line.startswith("A start's work on its weights, one thread:")]
    assert "fresh memory made resident at" in work
    assert (tmp_path / "qwen-sized-tokenizer.json").is_file()
