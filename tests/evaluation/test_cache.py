"""The answer cache's key: what changes the model's answers, and nothing else."""

from __future__ import annotations

from typing import Any

from edgevl.evaluation.cache import rule_version
from edgevl.rules import Rule


def _rule(**question: Any) -> Rule:
    return Rule.model_validate({"name": "r", "question": [{"id": "q", "ask": "Extract.", **question}]})


def test_a_schema_is_part_of_what_was_asked_and_a_threshold_is_not() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    free = rule_version(_rule(type="json"), 200_704)
    held = rule_version(_rule(type="json", schema=schema), 200_704)
    other = rule_version(_rule(type="json", schema={**schema, "required": ["n"]}), 200_704)
    assert len({free, held, other}) == 3
    assert rule_version(_rule(type="yes_no"), 200_704) == rule_version(_rule(type="yes_no", alarm_above=0.9), 200_704)
