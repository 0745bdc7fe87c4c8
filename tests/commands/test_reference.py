"""The configuration reference is the code's: generated, kept current, every key described."""

from __future__ import annotations

import json
import subprocess
import sys

from pydantic import BaseModel

from edgevl.commands.reference import reference
from edgevl.config import Config
from edgevl.errors import model_in
from edgevl.rules import RulesFile
from tests.harness import ROOT


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[type[BaseModel]]:
    seen.add(model)
    for field in model.model_fields.values():
        inner = model_in(field.annotation)
        if inner is not None and inner not in seen:
            _models(inner, seen)
    return seen


def test_docs_config_md_is_what_the_command_writes() -> None:
    # Regenerate with: .venv/bin/edgevl config reference > docs/config.md
    assert (ROOT / "docs" / "config.md").read_text() == reference()


def test_every_key_has_a_description() -> None:
    undescribed = [f"{model.__name__}.{name}" for model in _models(Config, set()) | _models(RulesFile, set())
                   for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert undescribed == []


def test_the_schema_command_describes_both_files() -> None:
    proc = subprocess.run([sys.executable, "-m", "edgevl", "config", "schema"], capture_output=True, text=True,
                          check=True)
    schema = json.loads(proc.stdout)
    assert set(schema) == {"edgevl.toml", "rules.toml"}
    assert "retention" in schema["edgevl.toml"]["properties"]
    assert "rule" in schema["rules.toml"]["properties"]
