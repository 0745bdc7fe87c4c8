"""Calibrations written into a real rules file: only the keys written change."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest

from edgevl.errors import ConfigError
from edgevl.evaluation.rulesfile import write_calibrations
from edgevl.rules import load_rules
from tests.harness import ROOT


def test_the_example_rules_keep_every_comment_and_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    shutil.copy(ROOT / "etc" / "edgevl" / "rules.toml", rules)
    rules.chmod(0o640)
    before = rules.read_text().splitlines()
    changed = write_calibrations(rules, "weld-seam", {
        "defect": {"calibration": {"slope": 0.7, "offset": -0.2, "labels": 40}, "alarm_above": 0.81},
        "connector": {"calibration": {"temperature": 1.5, "labels": 40}},
    })
    assert changed == ["defect.calibration = {'slope': 0.7, 'offset': -0.2, 'labels': 40}",
                       "defect.alarm_above = 0.81", "connector.calibration = {'temperature': 1.5, 'labels': 40}"]
    after = rules.read_text().splitlines()
    diff = [line for line in difflib.ndiff(before, after) if line[:1] in "+-"]
    assert [line[:1] for line in diff] == ["-", "+", "+", "+"]
    assert diff[1].startswith("+   alarm_above = 0.81 ")
    assert "calibration = {slope = 0.7, offset = -0.2, labels = 40}" in diff[2]
    assert "calibration = {temperature = 1.5, labels = 40}" in diff[3]
    assert rules.stat().st_mode & 0o777 == 0o640
    defect, connector = load_rules(rules).get("weld-seam").questions[:2]
    assert defect.calibration is not None
    assert (defect.calibration.slope, defect.alarm_above) == (0.7, 0.81)
    assert connector.calibration is not None
    assert connector.calibration.temperature == 1.5


def test_nothing_is_written_when_the_question_is_missing_or_the_result_invalid(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    shutil.copy(ROOT / "etc" / "edgevl" / "rules.toml", rules)
    before = rules.read_text()
    with pytest.raises(ConfigError, match='rule "weld-seam", question "ghost" is not in the rules file'):
        write_calibrations(rules, "weld-seam", {"ghost": {"calibration": {"temperature": 1.0}}})
    with pytest.raises(ConfigError, match="yes_no calibration is"):
        write_calibrations(rules, "weld-seam", {"defect": {"calibration": {"temperature": 1.0}}})
    assert rules.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rules.toml"]
