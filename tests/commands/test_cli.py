"""``edgevl ask`` as a user runs it: a real process, real files, JSON lines on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness.images import encode, noise_image


def _ask(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgevl", "ask", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_ask_prints_one_record_per_image_and_fails_on_bad_ones(tmp_path: Path, test_model_dir: Path) -> None:
    good = tmp_path / "frame.jpg"
    good.write_bytes(encode(noise_image(320, 180), "JPEG"))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(encode(noise_image(200, 200), "PNG")[:500])
    absent = tmp_path / "absent.png"
    proc = _ask(str(good), str(truncated), str(absent), "--model", str(test_model_dir),
                "-q", "Read the label.", "-q", "yes_no: Is there a defect?", "-q", "choice(A|B|C): Which type?",
                "-q", "number: How many parts?", "--max-pixels", "40000")
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["schema"] for r in records] == ["edgevl.result/2", "edgevl.error/1", "edgevl.error/1"]
    ok = records[0]
    assert ok["source"] == {"kind": "cli", "path": str(good)}
    assert ok["image"]["format"] == "JPEG"
    assert (ok["image"]["width"], ok["image"]["height"]) == (320, 180)
    assert ok["model"]["precision"] == "float32"
    assert set(ok["answers"]) == {"q1", "q2", "q3", "q4"}
    assert ok["answers"]["q2"]["type"] == "yes_no"
    assert isinstance(ok["answers"]["q2"]["value"], bool)
    assert ok["answers"]["q3"]["value"] in ("A", "B", "C")
    number = ok["answers"]["q4"]
    assert isinstance(number["value"], float) or number["error"]["code"] == "number_not_found"
    assert set(ok["timings_ms"]) == {"decode", "encode", "answer", "total"}
    assert records[1]["error"]["code"] == "image_unreadable"
    assert records[2]["error"]["code"] == "file_unreadable"
    assert len({r["job_id"] for r in records}) == 3
    assert "2 of 3 images failed" in proc.stderr


def test_ask_with_a_rule_and_crop(tmp_path: Path, test_model_dir: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text("""
[[rule]]
name = "seam"
crop = [10, 10, 100, 80]
max_pixels = 20000
  [[rule.question]]
  id = "defect"
  ask = "Is there a visible defect?"
  type = "yes_no"
  alarm_above = 0.0
""")
    image = tmp_path / "a.png"
    image.write_bytes(encode(noise_image(200, 150), "PNG"))
    proc = _ask(str(image), "--model", str(test_model_dir), "--rules", str(rules), "--rule", "seam")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["rule"] == "seam"
    assert record["answers"]["defect"]["alarm"] is True  # any P(yes) > 0


def test_ask_usage_errors_exit_2_with_a_message(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(encode(noise_image(20, 20), "PNG"))
    proc = _ask(str(image), "--model", "nobody/absent-model", "-q", "hi")
    assert proc.returncode == 2
    assert "edgevl model pull nobody/absent-model" in proc.stderr
    proc = _ask(str(image), "-q", "choice(A): pick")
    assert proc.returncode == 2
    assert "at least two options" in proc.stderr
    proc = _ask(str(image))
    assert proc.returncode == 2
    assert "no questions" in proc.stderr
