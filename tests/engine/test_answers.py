"""Typed answers from decoded text."""

from __future__ import annotations

import json
import math

import pytest

from edgevl.engine.answers import choice_answer, constrained_answer, generated_answer, parse_json, yes_no_answer
from edgevl.errors import AnswerError
from edgevl.questions import Question, sigmoid, softmax


def test_parse_json_accepts_fences_and_rejects_garbage() -> None:
    assert parse_json('{"a": 1}') == {"a": 1}
    assert parse_json('```json\n{"ok": true}\n```') == {"ok": True}
    with pytest.raises(AnswerError) as err:
        parse_json("{'a': 1")
    assert err.value.code == "invalid_json"


def test_failed_parse_keeps_the_answer_with_its_error_and_raw_text() -> None:
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
    ({"type": "yes_no", "calibration": {"temperature": 2.0}}, "yes_no calibration is {slope, offset}"),
    ({"type": "yes_no", "calibration": {"slope": 1.0}}, "yes_no calibration is {slope, offset}"),
    ({"type": "choice", "options": ("a", "b"), "calibration": {"slope": 1.0, "offset": 0.0}}, "is {temperature}"),
    ({"type": "number", "calibration": {"temperature": 2.0}}, "not number"),
    ({"type": "yes_no", "calibration": {"slope": -1.0, "offset": 0.0}}, "greater than 0"),
])
def test_question_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Question(id="q", ask="?", **kwargs)  # type: ignore[arg-type]


def test_yes_no_confidence_is_that_of_the_answer_given() -> None:
    q = Question(id="d", ask="Defect?", type="yes_no", alarm_above=0.01)
    no = yes_no_answer(q, math.log(0.02 / 0.98))
    assert (no["value"], no["text"]) == (False, "no")
    assert no["p_yes"] == pytest.approx(0.02)
    assert no["confidence"] == pytest.approx(0.98), "a confident no reads 0.98"
    assert no["alarm"] is True, "the alarm follows P(yes), not the answer"
    assert "p_yes_raw" not in no
    yes = yes_no_answer(q, math.log(0.9 / 0.1))
    assert (yes["value"], yes["p_yes"], yes["confidence"]) == (True, pytest.approx(0.9), pytest.approx(0.9))


def test_a_calibrated_yes_no_answer_carries_both_probabilities() -> None:
    q = Question(id="d", ask="Defect?", type="yes_no", alarm_above=0.5,
                 calibration={"slope": 0.5, "offset": -1.0})  # type: ignore[arg-type]
    answer = yes_no_answer(q, 3.0)  # the model says P(yes) = 0.953
    assert answer["p_yes_raw"] == pytest.approx(sigmoid(3.0), abs=1e-6)
    assert answer["p_yes"] == pytest.approx(sigmoid(0.5), abs=1e-6)
    assert (answer["value"], answer["alarm"]) == (True, True)
    doubtful = yes_no_answer(q, 1.0)  # the model says 0.73; calibrated it is 0.38
    assert (doubtful["value"], doubtful["text"], doubtful["alarm"]) == (False, "no", False)
    assert doubtful["confidence"] == pytest.approx(1 - sigmoid(-0.5), abs=1e-6)


def test_a_calibrated_choice_is_softened_but_keeps_its_option() -> None:
    q = Question(id="c", ask="Which?", type="choice", options=("a", "b", "c"),
                 calibration={"temperature": 4.0})  # type: ignore[arg-type]
    answer = choice_answer(q, [-1.0, -0.1, -5.0])
    assert answer["value"] == "b"
    assert answer["confidence_raw"] == pytest.approx(softmax([-1.0, -0.1, -5.0])[1], abs=1e-6)
    assert answer["confidence"] == pytest.approx(softmax([-0.25, -0.025, -1.25])[1], abs=1e-6)
    assert answer["confidence"] < answer["confidence_raw"]


def test_prompt_text_only_changes_typed_questions() -> None:
    assert Question(id="t", ask="Read the label.").prompt_text() == "Read the label."
    assert Question(id="y", ask="Defect?", type="yes_no").prompt_text() == "Defect? Answer yes or no."
    assert "one of: x, y" in Question(id="c", ask="Which?", type="choice", options=("x", "y")).prompt_text()


def test_a_constrained_number_beyond_a_float_is_an_error_inside_the_answer_not_invalid_json() -> None:
    from edgevl.records import to_json

    class Done:  # a constraint whose grammar was completed
        failed = None
        accepting = True

    number = Question(id="n", ask="How many?", type="number")
    assert constrained_answer(number, "12", Done(), True)["value"] == 12.0  # type: ignore[arg-type]
    for text in ("1e999", "-1e400", "1" + "0" * 400):
        answer = constrained_answer(number, text, Done(), True)  # type: ignore[arg-type]
        assert answer["value"] is None
        assert answer["error"]["code"] == "value_out_of_range"
    schema = Question.model_validate({"id": "j", "ask": "x", "type": "json",
                                      "schema": {"type": "object", "properties": {"v": {"type": "number"}}}})
    answer = constrained_answer(schema, '{"v":1e999}', Done(), True)  # type: ignore[arg-type]
    assert answer["error"]["code"] == "value_out_of_range"
    # Strict JSON: Python's reader would take Infinity, a dashboard's would not.
    text = to_json({"answers": {"j": answer}})  # type: ignore[typeddict-item]
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a record")) == {"answers": {"j": answer}}
