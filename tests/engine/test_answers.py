"""Typed answers from decoded text."""

from __future__ import annotations

import pytest

from edgevl.engine.answers import choice_answer, generated_answer, parse_json, parse_number
from edgevl.errors import AnswerError
from edgevl.questions import Question


@pytest.mark.parametrize(("text", "value"), [
    ("42", 42.0), ("There are 3 parts.", 3.0), ("-7.5 mm", -7.5), ("3,5", 3.5), ("1,234,567 units", 1234567.0),
    ("1,234.5", 1234.5), ("about 2e3", 2000.0), ("+12", 12.0), (".5", 0.5),
])
def test_parse_number(text: str, value: float) -> None:
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["none", "", "many"])
def test_parse_number_fails_clearly(text: str) -> None:
    with pytest.raises(AnswerError) as err:
        parse_number(text)
    assert err.value.code == "number_not_found"


def test_parse_json_accepts_fences_and_rejects_garbage() -> None:
    assert parse_json('{"a": 1}') == {"a": 1}
    assert parse_json('```json\n{"ok": true}\n```') == {"ok": True}
    with pytest.raises(AnswerError) as err:
        parse_json("{'a': 1")
    assert err.value.code == "invalid_json"


def test_failed_parse_keeps_the_answer_with_its_error_and_raw_text() -> None:
    q = Question(id="n", ask="How many?", type="number")
    answer = generated_answer(q, "several", truncated=False)
    assert answer["value"] is None
    assert answer["text"] == "several"
    assert answer["error"]["code"] == "number_not_found"
    j = generated_answer(Question(id="j", ask="Give JSON", type="json"), "not json", truncated=True)
    assert j["error"]["code"] == "invalid_json"
    assert j["truncated"] is True
    assert j["text"] == "not json"


def test_choice_answer_probabilities() -> None:
    q = Question(id="c", ask="Which?", type="choice", options=("a", "b", "c"))
    answer = choice_answer(q, [-1.0, -0.1, -5.0])
    assert answer["value"] == "b"
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["confidence"] == answer["probabilities"]["b"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"type": "choice", "options": ("a",)}, "at least two"),
    ({"type": "choice", "options": ("a", "a")}, "distinct"),
    ({"type": "text", "options": ("a", "b")}, "only for choice"),
    ({"type": "text", "alarm_above": 0.5}, "only for yes_no"),
    ({"type": "yes_no", "max_tokens": 4}, "scored, not generated"),
])
def test_question_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Question(id="q", ask="?", **kwargs)  # type: ignore[arg-type]


def test_prompt_text_only_changes_typed_questions() -> None:
    assert Question(id="t", ask="Read the label.").prompt_text() == "Read the label."
    assert Question(id="y", ask="Defect?", type="yes_no").prompt_text() == "Defect? Answer yes or no."
    assert "one of: x, y" in Question(id="c", ask="Which?", type="choice", options=("x", "y")).prompt_text()
