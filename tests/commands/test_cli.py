"""``edgevl ask`` as a user runs it: a real process, real files, JSON lines on stdout."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgevl.cli import _parser
from edgevl.commands.ask import parse_question
from edgevl.errors import ConfigError
from tests.harness.broker import free_port
from tests.harness.documents import pages, pdf_of
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
    assert ok["answers"]["q2"]["question"] == "Is there a defect?", "an ad-hoc question's text is in the record"
    number = ok["answers"]["q4"]
    assert isinstance(number["value"], float), "a number answer is generated under a number's grammar"
    assert set(ok["timings_ms"]) == {"decode", "encode", "answer", "total"}
    assert records[1]["error"]["code"] == "image_unreadable"
    assert records[2]["error"]["code"] == "file_unreadable"
    assert len({r["job_id"] for r in records}) == 3
    assert "2 of 3 images failed" in proc.stderr


def test_ask_answers_every_page_of_a_pdf(tmp_path: Path, test_model_dir: Path) -> None:
    scan = tmp_path / "scan.pdf"
    scan.write_bytes(pdf_of(pages(3)))
    proc = _ask(str(scan), "--model", str(test_model_dir), "-q", "yes_no: Is it signed?", "--max-pixels", "40000")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["document"] == {"format": "PDF", "page_count": 3, "pages": [1, 2, 3]}
    assert [p["page"] for p in record["pages"]] == [1, 2, 3]
    for page in record["pages"]:
        assert page["answers"]["q1"]["question"] == "Is it signed?"
        assert isinstance(page["answers"]["q1"]["value"], bool)


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
    assert "question" not in record["answers"]["defect"]
    assert record["answers"]["defect"]["alarm"] is True  # any P(yes) > 0


def test_ask_answers_several_images_together_as_each_alone(tmp_path: Path, test_model_dir: Path) -> None:
    paths = []
    for n, size in enumerate([(320, 180), (120, 200), (200, 200), (90, 90), (260, 140)]):
        paths.append(tmp_path / f"f{n}.jpg")
        paths[-1].write_bytes(encode(noise_image(*size, seed=n), "JPEG"))
    paths.insert(2, tmp_path / "absent.jpg")
    common = ["--model", str(test_model_dir), "-q", "Read the label.", "-q", "yes_no: Is there a defect?",
              "-q", "choice(A|B|C): Which type?", "--max-pixels", "40000"]

    def answers(*extra: str) -> list[dict[str, object]]:
        proc = _ask(*map(str, paths), *common, *extra)
        assert proc.returncode == 1, proc.stderr  # the absent one
        records = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [Path(r["source"]["path"]).name for r in records] == [p.name for p in paths], "in the order given"
        return [{k: (a["value"], round(a.get("probability", 0.0), 4)) for k, a in r.get("answers", {}).items()}
                for r in records]

    # Four at a time: a stream of four with the absent file among them, then one of two.
    together = answers("--max-frames", "4")
    assert together == answers("--max-frames", "1")
    assert together[2] == {}
    assert all(together[i] for i in (0, 1, 3, 4, 5))
    assert _ask(str(paths[0]), *common, "--max-frames", "-1").returncode == 2


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


def test_a_typo_in_a_question_type_is_an_error_not_a_text_question() -> None:
    with pytest.raises(ConfigError, match='unknown answer type \'yesno\' — did you mean "yes_no"'):
        parse_question(1, "yesno: Is there a defect?")
    with pytest.raises(ConfigError, match="unknown answer type 'chioce'"):
        parse_question(1, "chioce(A|B): Which?")
    with pytest.raises(ConfigError, match="unknown answer type 'bool'"):
        parse_question(1, "bool: Is it open?")
    # A question that merely starts with a word and a colon stays a text question.
    assert parse_question(1, "Label: what does it say?").type == "text"
    assert parse_question(1, "text: yesno: a question about a word").ask == "yesno: a question about a word"
    assert parse_question(2, "number: How many?").type == "number"


def test_every_command_and_option_has_help() -> None:
    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                names = {a.dest for a in action._choices_actions}
                missing += [f"{path} {name}" for name in action.choices if name not in names]
                for name, child in action.choices.items():
                    missing += walk(child, f"{path} {name}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        return missing

    assert walk(_parser(), "edgevl") == []


def test_model_pull_without_a_network_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-m", "edgevl", "model", "pull", "Qwen/Qwen3-VL-2B-Instruct"],
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("edgevl: cannot download Qwen/Qwen3-VL-2B-Instruct: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_log_level_hides_what_is_below_it(tmp_path: Path, test_model_dir: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(encode(noise_image(64, 64), "PNG"))
    quiet = subprocess.run([sys.executable, "-m", "edgevl", "--log-level", "warning", "ask", str(image),
                            "--model", str(test_model_dir), "-q", "yes_no: Defect?"],
                           capture_output=True, text=True, timeout=300, check=False)
    assert quiet.returncode == 0, quiet.stderr
    assert "INFO" not in quiet.stderr
    loud = _ask(str(image), "--model", str(test_model_dir), "-q", "yes_no: Defect?")
    assert "INFO" in loud.stderr
