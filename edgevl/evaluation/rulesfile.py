"""Writing fitted calibrations and alarm thresholds into the rules file, its comments and layout kept."""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from pathlib import Path
from typing import Any

import tomlkit
from pydantic import ValidationError
from tomlkit.items import AoT, Table

from edgevl.errors import ConfigError, format_validation_error
from edgevl.rules import RulesFile


def _question_table(document: tomlkit.TOMLDocument, rule: str, question: str) -> Table:
    rules = document.get("rule")
    if not isinstance(rules, AoT):
        raise ConfigError("the rules file has no [[rule]] tables")
    for table in rules:
        if table.get("name") == rule:
            for q in table.get("question", []):
                if q.get("id") == question:
                    return q  # type: ignore[no-any-return]
    raise ConfigError(f'rule "{rule}", question "{question}" is not in the rules file as a [[rule.question]] table')


def write_calibrations(path: Path, rule: str, proposals: dict[str, dict[str, Any]]) -> list[str]:
    """Set ``calibration`` (and ``alarm_above`` where proposed) on the rule's questions; returns what changed.

    The new text is validated as a rules file before it replaces the old one, atomically.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the rules file: {exc.strerror or exc}") from None
    document = tomlkit.parse(text)
    changed = []
    stamp = dt.date.today().isoformat()
    for question_id, proposal in proposals.items():
        table = _question_table(document, rule, question_id)
        calibration = tomlkit.inline_table()
        calibration.update(proposal["calibration"])
        table["calibration"] = calibration
        table["calibration"].comment(f"edgevl eval --calibrate, {stamp}")
        changed.append(f"{question_id}.calibration = {proposal['calibration']}")
        if proposal.get("alarm_above") is not None:
            table["alarm_above"] = proposal["alarm_above"]
            changed.append(f"{question_id}.alarm_above = {proposal['alarm_above']}")
    new_text = tomlkit.dumps(document)
    raw = tomllib.loads(new_text)
    try:
        RulesFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(format_validation_error(path, exc, raw, RulesFile))) from None
    tmp = path.with_name(f".{path.name}.edgevl-eval")
    tmp.write_text(new_text, encoding="utf-8")
    os.chmod(tmp, path.stat().st_mode & 0o7777)
    tmp.replace(path)
    return changed
