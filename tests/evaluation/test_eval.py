"""``edgevl eval`` end to end with the test model: real images, real labels files, the real engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgevl.evaluation.command import run_eval
from edgevl.evaluation.summary import Settings
from edgevl.questions import sigmoid
from edgevl.rules import load_rules
from tests.harness.images import encode, noise_image

pytestmark = pytest.mark.slow

RULES = """\
# Commissioning rules for line 3.
[[rule]]
name = "weld"
max_pixels = 12544
max_bytes = "256KiB"

[[rule.question]]
id = "defect"  # the question the line stops for
ask = "Is there a defect on the weld seam?"
type = "yes_no"

[[rule.question]]
id = "kind"
ask = "Which connector is fitted?"
type = "choice"
options = ["type-A", "type-B", "none"]

[[rule.question]]
id = "label"
ask = "Read the label."
max_tokens = 3

[[rule.question]]
id = "count"
ask = "How many parts?"
type = "number"
max_tokens = 3
"""


def _images(folder: Path, n: int, size: int = 96) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"frame{i:03d}.png"
        (folder / name).write_bytes(encode(noise_image(size + i % 7, size, seed=100 + i), "PNG"))
        names.append(name)
    return names


def _csv(folder: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    lines = [",".join(["file", *columns])]
    for row in rows:
        lines.append(",".join([row["file"], *(str(row.get(c, "")) for c in columns)]))
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")


def _eval(capsys: pytest.CaptureFixture[str], folder: Path, rules: Path, model: Path, cache: Path,
          precisions: tuple[str, ...] = ("float32",), **kwargs: Any) -> dict[str, Any]:
    settings = Settings(kwargs.pop("max_false_alarm_rate", 0.01), 0.0, kwargs.pop("calibrate", False))
    code = run_eval(folder, rules, "weld", str(model), list(precisions), kwargs.pop("report", None), settings,
                    kwargs.pop("write", False), cache, 1)
    assert code == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


@pytest.fixture
def answered_set(tmp_path: Path, test_model_dir: Path, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """24 frames, their float32 answers read back from a first evaluation's cache."""
    folder, rules, cache = tmp_path / "set", tmp_path / "rules.toml", tmp_path / "cache.jsonl"
    rules.write_text(RULES)
    names = _images(folder, 24)
    _csv(folder, [{"file": n} for n in names], [])  # no labels yet: only the answers are wanted
    first = _eval(capsys, folder, rules, test_model_dir, cache)
    assert first["precisions"]["float32"]["answered_now"] == 24
    entries = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    assert len(entries) == 24
    # The cache holds the images in the order they were answered, which is the labels' order.
    answers = [e["answers"] for e in entries]
    scores = [e["scores"] for e in entries]
    return folder, rules, cache, names, answers, scores


def test_labels_equal_to_the_answers_score_exactly_one_and_k_flips_score_n_minus_k(
        answered_set, test_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    folder, rules, cache, names, answers, _ = answered_set
    rows = [{"file": n, "defect": "yes" if a["defect"]["value"] else "no", "kind": a["kind"]["value"],
             "label": a["label"]["text"]} for n, a in zip(names, answers, strict=True)]
    _csv(folder, rows, ["defect", "kind", "label"])
    summary = _eval(capsys, folder, rules, test_model_dir, cache)
    assert summary["schema"] == "edgevl.eval/1"
    result = summary["precisions"]["float32"]
    assert result["answered_now"] == 0, "every answer came from the cache"
    figures = result["questions"]
    assert figures["defect"]["accuracy"] == 1.0
    assert figures["kind"]["accuracy"] == 1.0
    assert figures["label"]["exact_match"] == 1.0
    assert figures["defect"]["labelled"] == 24
    assert figures["count"]["labelled"] == 0
    assert figures["count"]["mean_absolute_error"] is None
    assert figures["count"]["undefined"]["mean_absolute_error"]

    k = 5
    options = ["type-A", "type-B", "none"]
    for row in rows[:k]:
        row["defect"] = "no" if row["defect"] == "yes" else "yes"
        row["kind"] = options[(options.index(row["kind"]) + 1) % 3]
    _csv(folder, rows, ["defect", "kind", "label"])
    figures = _eval(capsys, folder, rules, test_model_dir, cache)["precisions"]["float32"]["questions"]
    assert figures["defect"]["accuracy"] == round((24 - k) / 24, 6)
    assert figures["kind"]["accuracy"] == round((24 - k) / 24, 6)
    assert sum(map(sum, figures["kind"]["confusion"]["counts"])) == 24
    trace = sum(figures["kind"]["confusion"]["counts"][i][i] for i in range(3))
    assert trace == 24 - k


def test_calibrate_and_write_keep_the_rules_file_and_the_appliance_then_answers_calibrated(
        answered_set, test_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    folder, rules, cache, names, answers, scores = answered_set
    # "yes" for the frames the model scores highest: a ranking a calibration can map to probabilities.
    log_odds = [s["defect"][0] for s in scores]
    ranked = sorted(log_odds)
    cut = ranked[len(ranked) // 2]
    rows = [{"file": n, "defect": "yes" if x >= cut else "no"} for n, x in zip(names, log_odds, strict=True)]
    # The fourth frame from the top of the "no" half is labelled "yes": not separable, a false-alarm trade-off.
    rows[log_odds.index(ranked[len(ranked) // 2 - 4])]["defect"] = "yes"
    options = ["type-A", "type-B", "none"]
    for i, (row, answer) in enumerate(zip(rows, answers, strict=True)):
        chosen = answer["kind"]["value"]
        row["kind"] = chosen if i % 4 else options[(options.index(chosen) + 1) % 3]
    _csv(folder, rows, ["defect", "kind"])

    summary = _eval(capsys, folder, rules, test_model_dir, cache, calibrate=True, write=True,
                    max_false_alarm_rate=0.0)
    fit = summary["precisions"]["float32"]["questions"]["defect"]["calibration"]
    assert fit["slope"] > 0
    assert 0 <= fit["brier_cross_validated"] <= 1, "judged on frames each fold's fit did not see"
    assert fit["expected_calibration_error_cross_validated"] is not None
    assert fit["alarm_threshold"]["false_alarm_rate"] == 0.0
    temperature = summary["precisions"]["float32"]["questions"]["kind"]["calibration"]["temperature"]
    assert temperature > 0

    text = rules.read_text()
    assert text.startswith("# Commissioning rules for line 3.\n"), "the comments are kept"
    assert 'id = "defect"  # the question the line stops for' in text
    defect, kind = load_rules(rules).get("weld").questions[:2]
    assert defect.calibration is not None
    assert (defect.calibration.slope, defect.calibration.offset) == (fit["slope"], fit["offset"])
    assert defect.calibration.labels == 24
    assert defect.alarm_above == fit["alarm_above"]
    assert kind.calibration is not None
    assert kind.calibration.temperature == temperature

    # Evaluated again with the calibrated rule, from the cache: the figures are the proposal's.
    after = _eval(capsys, folder, rules, test_model_dir, cache)["precisions"]["float32"]["questions"]["defect"]
    assert after["brier"] == pytest.approx(fit["brier_calibrated"], abs=1e-6)
    assert after["configured_alarm"]["false_alarm_rate"] == 0.0
    assert after["configured_alarm"]["miss_rate"] == fit["alarm_threshold"]["miss_rate"]

    # The appliance's own path answers with the calibration: edgevl ask on one frame.
    proc = subprocess.run([sys.executable, "-m", "edgevl", "ask", str(folder / names[0]), "--rules", str(rules),
                           "--rule", "weld", "--model", str(test_model_dir)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)["answers"]["defect"]
    assert answer["p_yes_raw"] == pytest.approx(sigmoid(log_odds[0]), abs=1e-5)
    assert answer["p_yes"] == pytest.approx(sigmoid(fit["slope"] * log_odds[0] + fit["offset"]), abs=1e-5)
    assert answer["alarm"] is (answer["p_yes"] > fit["alarm_above"])


def test_too_few_labels_say_so_and_write_nothing(
        answered_set, test_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    folder, rules, cache, names, _, _ = answered_set
    _csv(folder, [{"file": n, "defect": "yes" if i < 3 else "no"} for i, n in enumerate(names)], ["defect"])
    before = rules.read_text()
    settings = Settings(0.01, 0.0, True)
    code = run_eval(folder, rules, "weld", str(test_model_dir), ["float32"], None, settings, True, cache, 1)
    captured = capsys.readouterr()
    assert code == 1
    fit = json.loads(captured.out)["precisions"]["float32"]["questions"]["defect"]["calibration"]
    assert fit == {"error": "a fit needs at least 20 labelled answers with 5 of each class; there are 24 "
                            "(3 yes, 21 no)"}
    assert "nothing to write" in captured.err
    assert rules.read_text() == before


def test_precisions_compared_and_a_report_a_browser_renders(
        tmp_path: Path, test_model_dir: Path, capsys: pytest.CaptureFixture[str], browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    folder, rules, cache = tmp_path / "set", tmp_path / "rules.toml", tmp_path / "cache.jsonl"
    rules.write_text(RULES)
    names = _images(folder, 12)
    (folder / "cut.png").write_bytes(encode(noise_image(96, 96), "PNG")[:200])
    (folder / "huge.png").write_bytes(encode(noise_image(96, 96), "PNG") + bytes(300 << 10))
    rows = [{"file": n, "defect": "yes" if i % 3 == 0 else "no", "kind": "none", "count": i % 4}
            for i, n in enumerate([*names, "cut.png", "huge.png"])]
    _csv(folder, rows, ["defect", "kind", "count"])
    report = tmp_path / "report.html"
    summary = _eval(capsys, folder, rules, test_model_dir, cache, ("float32", "int8"), report=report)
    for precision in ("float32", "int8"):
        result = summary["precisions"][precision]
        assert (result["images_answered"], result["images_failed"]) == (12, 2)
        assert [(f["file"], f["code"]) for f in result["failed_images"]] == [
            ("cut.png", "image_unreadable"), ("huge.png", "file_too_large")], "the rule's max_bytes holds here too"
        assert result["seconds_per_image"] > 0
        defect = result["questions"]["defect"]
        assert 0.0 <= defect["agreement_with_float32"] <= 1.0
        assert set(defect) >= {"accuracy", "roc_auc", "brier", "expected_calibration_error", "alarm_threshold",
                               "f1_best", "confusion"}
    assert summary["precisions"]["float32"]["questions"]["defect"]["agreement_with_float32"] == 1.0
    kind = summary["precisions"]["float32"]["questions"]["kind"]
    assert kind["confusion"]["labels"] == ["type-A", "type-B", "none"]

    browser.get(report.as_uri())
    sections = browser.find_elements(By.CSS_SELECTOR, "section.precision")
    assert [s.get_attribute("id") for s in sections] == ["float32", "int8"]
    plots = browser.find_elements(By.CSS_SELECTOR, "img.plot")
    kinds = {p.get_attribute("data-plot") for p in plots}
    assert kinds == {"roc", "reliability", "confusion"}
    # Every plot is an embedded picture that decoded: no external assets.
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 100", p)
               for p in plots)
    assert all(p.get_attribute("src").startswith("data:image/png;base64,") for p in plots)
    assert "cut.png" in browser.find_element(By.ID, "failed").text
    assert "huge.png" in browser.find_element(By.ID, "failed").text
    shot = Path(os.environ.get("EDGEVL_TEST_ARTIFACTS", tmp_path)) / "eval-report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot))


def test_the_answer_cache_survives_kill_9(tmp_path: Path, test_model_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder, rules, cache = tmp_path / "set", tmp_path / "rules.toml", tmp_path / "cache.jsonl"
    rules.write_text(RULES)
    names = _images(folder, 40)
    _csv(folder, [{"file": n, "defect": "yes" if i % 2 else "no"} for i, n in enumerate(names)], ["defect"])
    proc = subprocess.Popen([sys.executable, "-m", "edgevl", "eval", str(folder), "--rules", str(rules),
                             "--rule", "weld", "--model", str(test_model_dir), "--cache", str(cache)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (cache.exists() and cache.read_bytes().count(b"\n") >= 4):
            assert proc.poll() is None, "the evaluation ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    kept = [line for line in cache.read_text().splitlines() if line.strip()]
    assert 2 <= len(kept) < 40
    with cache.open("a") as f:
        f.write('{"key": "a line torn by the kill')  # what a kill in the middle of a write leaves

    resumed = _eval(capsys, folder, rules, test_model_dir, cache)["precisions"]["float32"]
    assert resumed["answered_now"] == 40 - len(kept)
    fresh = _eval(capsys, folder, rules, test_model_dir, tmp_path / "fresh.jsonl")["precisions"]["float32"]
    assert fresh["answered_now"] == 40
    for figures in (resumed, fresh):
        figures.pop("answered_now")
        figures.pop("seconds_per_image")
    assert resumed == fresh, "answers from the cache are the answers"


def test_bad_labels_and_options_exit_2_with_each_row_named(tmp_path: Path, test_model_dir: Path) -> None:
    folder, rules = tmp_path / "set", tmp_path / "rules.toml"
    rules.write_text(RULES)
    names = _images(folder, 2)
    (folder / "labels.csv").write_text(f"file,defect,kind\n{names[0]},perhaps,\nghost.png,yes,\n{names[1]},,type-Z\n")

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgevl", "eval", str(folder), "--rules", str(rules),
                               "--rule", "weld", "--model", str(test_model_dir), "--cache",
                               str(tmp_path / "c.jsonl"), *extra], capture_output=True, text=True, timeout=300,
                              check=False)

    proc = run()
    assert proc.returncode == 2
    assert proc.stdout == ""
    labels = folder / "labels.csv"
    assert f"{labels}:2: defect: 'perhaps' is not yes or no" in proc.stderr
    assert f"{labels}:3: 'ghost.png': no such image" in proc.stderr
    assert f"{labels}:4: kind: 'type-Z' is not one of the options: type-A, type-B, none" in proc.stderr
    assert not (tmp_path / "c.jsonl").exists() or not (tmp_path / "c.jsonl").read_text().strip()
    assert "--write writes what --calibrate fits" in run("--write").stderr
    assert "one or more of float32" in run("--precision", "float32,int3").stderr
    assert "the folder for the report does not exist" in run("--report", str(tmp_path / "no" / "r.html")).stderr


def test_the_appliance_configuration_gives_the_rules_model_and_precision(tmp_path: Path,
                                                                         test_model_dir: Path) -> None:
    folder = tmp_path / "set"
    (tmp_path / "rules.toml").write_text(RULES.replace('max_pixels = 12544\n', ''))
    names = _images(folder, 3)
    _csv(folder, [{"file": n, "defect": "no"} for n in names], ["defect"])
    config = tmp_path / "edgevl.toml"
    config.write_text(f'rules = "rules.toml"\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[model]\nid = "{test_model_dir}"\nprecision = "int8"\nmax_pixels = 9216\n')
    proc = subprocess.run([sys.executable, "-m", "edgevl", "eval", str(folder), "-c", str(config), "--rule", "weld",
                           "--cache", str(tmp_path / "c.jsonl")], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["model"] == str(test_model_dir)
    assert list(summary["precisions"]) == ["int8"]
    assert summary["precisions"]["int8"]["questions"]["defect"]["accuracy"] is not None
    # The resolution is part of what was asked: another max_pixels is answered anew, not taken from the cache.
    again = subprocess.run([sys.executable, "-m", "edgevl", "eval", str(folder), "-c", str(config), "--rule", "weld",
                            "--cache", str(tmp_path / "c.jsonl"), "--max-pixels", "4096"], capture_output=True,
                           text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["precisions"]["int8"]["answered_now"] == 3
