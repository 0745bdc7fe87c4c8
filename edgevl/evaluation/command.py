"""``edgevl eval``: a rule's answers measured against labelled frames, per precision."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevl.config import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, PRECISIONS, Precision, load_config
from edgevl.errors import ConfigError
from edgevl.evaluation.cache import AnswerCache
from edgevl.evaluation.labels import load_labels
from edgevl.evaluation.runner import Outcome, answer_set
from edgevl.evaluation.summary import Settings, summarise
from edgevl.rules import load_rules


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgevl" / "eval-answers.jsonl"


def parse_precisions(text: str) -> list[Precision]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown or not names:
        raise ConfigError(f"--precision: {', '.join(unknown) or 'none given'}; one or more of {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(names))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Target:
    """What is evaluated: the rules file, the model, its precisions and default resolution."""

    rules: Path
    model: str
    precisions: list[Precision]
    max_pixels: int
    threads: int


def target(config: Path | None, rules: Path | None, model: str | None, precisions: str | None,
           max_pixels: int | None, threads: int | None) -> Target:
    """The appliance's own settings from ``config`` where given; each option given overrides its value."""
    if config is None and rules is None:
        raise ConfigError("give the rules with --rules FILE, or the appliance's configuration with -c FILE")
    settings = load_config(config) if config is not None else None
    chosen = precisions or (settings.model.precision if settings else "float32")
    return Target(
        rules=rules or (settings.rules if settings else Path()),
        model=model or (settings.model.id if settings else DEFAULT_MODEL),
        precisions=parse_precisions(chosen),
        max_pixels=max_pixels or (settings.model.max_pixels if settings else DEFAULT_MAX_PIXELS),
        threads=threads if threads is not None else (settings.model.threads if settings else 0),
    )


def proposals(summary: dict[str, Any], precision: str) -> dict[str, dict[str, Any]]:
    """Per question, the calibration (and alarm threshold) to write into the rule."""
    out = {}
    for question_id, figures in summary["precisions"][precision]["questions"].items():
        fit = figures.get("calibration")
        if not fit or "error" in fit:
            continue
        if figures["type"] == "yes_no":
            calibration = {"slope": fit["slope"], "offset": fit["offset"], "labels": fit["labels"]}
            out[question_id] = {"calibration": calibration, "alarm_above": fit.get("alarm_above")}
        else:
            out[question_id] = {"calibration": {"temperature": fit["temperature"], "labels": fit["labels"]}}
    return out


def _say_calibrations(summary: dict[str, Any]) -> None:
    for precision, result in summary["precisions"].items():
        for question_id, figures in result["questions"].items():
            fit = figures.get("calibration")
            if fit is None:
                continue
            if "error" in fit:
                print(f"{precision} {question_id}: no calibration: {fit['error']}", file=sys.stderr)
            else:
                keys = {k: fit[k] for k in ("slope", "offset", "temperature", "alarm_above") if k in fit}
                print(f"{precision} {question_id}: proposed {json.dumps(keys)}", file=sys.stderr)


def run_eval(folder: Path, rules_path: Path, rule_name: str, model: str, precisions: list[Precision],
             report: Path | None, settings: Settings, write: bool, cache_path: Path | None, threads: int,
             labels_path: Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    if write and not settings.calibrate:
        raise ConfigError("--write writes what --calibrate fits: give both")
    if write and len(precisions) != 1:
        raise ConfigError("--write needs one --precision: a calibration fits the answers of one precision")
    if not 0.0 <= settings.max_false_alarm_rate < 1.0:
        raise ConfigError("--max-false-alarm-rate is a rate in [0, 1)")
    if settings.tolerance < 0:
        raise ConfigError("--tolerance must not be negative")
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder")
    if report is not None and not report.parent.is_dir():
        raise ConfigError(f"{report}: the folder for the report does not exist")  # said before any answering
    rule = load_rules(rules_path).get(rule_name)
    labelled = load_labels(folder, rule.questions, labels_path)
    cache = AnswerCache(cache_path or default_cache())
    try:
        outcomes: dict[str, list[Outcome]] = {}
        for precision in precisions:
            outcomes[precision] = answer_set(labelled, rule, model, precision, threads, cache, max_pixels)
    finally:
        cache.close()
    summary = summarise(rule, labelled, model, outcomes, settings)
    print(json.dumps(summary, indent=2, ensure_ascii=False), flush=True)
    if settings.calibrate:
        _say_calibrations(summary)
    if report is not None:
        from edgevl.evaluation.report import render, write_report

        write_report(report, render(summary, rule, labelled, outcomes))
        print(f"report: {report}", file=sys.stderr)
    if write:
        from edgevl.evaluation.rulesfile import write_calibrations

        chosen = proposals(summary, precisions[0])
        if not chosen:
            print(f"{rules_path}: nothing to write: no question could be calibrated", file=sys.stderr)
            return 1
        for line in write_calibrations(rules_path, rule.name, chosen):
            print(f"{rules_path}: rule {rule.name!r}: {line}", file=sys.stderr)
    return 0
