"""Turning model output into typed answers a machine can act on."""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from edgevl.engine.grammar import Constraint, constrained_value
from edgevl.errors import AnswerError
from edgevl.questions import Question, sigmoid, softmax
from edgevl.records import Answer

YES_VARIANTS = ("Yes", "yes", "YES", " Yes", " yes", " YES")
NO_VARIANTS = ("No", "no", "NO", " No", " no", " NO")

_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


def single_token_ids(tokenizer: Any, variants: tuple[str, ...]) -> list[int]:
    """Ids of the variants that are one token each (the model's first answer token)."""
    ids: set[int] = set()
    for text in variants:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.add(int(encoded[0]))
    return sorted(ids)


def yes_no_log_odds(logprobs: torch.Tensor, yes_ids: list[int], no_ids: list[int]) -> float:
    """log P(yes) − log P(no) over the answer's first token: the score calibration starts from."""
    yes = torch.logsumexp(logprobs[yes_ids], dim=0)
    no = torch.logsumexp(logprobs[no_ids], dim=0)
    return float(yes - no)


def yes_no_answer(question: Question, log_odds: float) -> Answer:
    """``p_yes`` (calibrated when the question is), ``confidence`` = the probability of the answer given."""
    raw = sigmoid(log_odds)
    p_yes = question.calibration.p_yes(log_odds) if question.calibration else raw
    yes = p_yes >= 0.5
    answer: Answer = {
        "type": "yes_no",
        "value": yes,
        "p_yes": round(p_yes, 6),
        "confidence": round(p_yes if yes else 1.0 - p_yes, 6),
        "text": "yes" if yes else "no",
    }
    if question.calibration:
        answer["p_yes_raw"] = round(raw, 6)
    if question.alarm_above is not None:
        answer["alarm"] = p_yes > question.alarm_above
    return answer


def choice_answer(question: Question, scores: list[float]) -> Answer:
    """The most likely option; ``probabilities`` (calibrated when the question is) over all of them."""
    raw = softmax(scores)
    probs = question.calibration.option_probabilities(scores) if question.calibration else raw
    best = max(range(len(scores)), key=lambda i: scores[i])
    answer: Answer = {
        "type": "choice",
        "value": question.options[best],
        "confidence": round(probs[best], 6),
        "probabilities": {o: round(p, 6) for o, p in zip(question.options, probs, strict=True)},
        "text": question.options[best],
    }
    if question.calibration:
        answer["confidence_raw"] = round(raw[best], 6)
    return answer


def parse_json(text: str) -> Any:
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise AnswerError(f"the answer is not valid JSON ({exc.msg} at {exc.pos})", "invalid_json") from None


def generated_answer(question: Question, text: str, truncated: bool) -> Answer:
    """A free answer: text, or a json question without a schema (parsed when it parses).  Numbers and json
    with a schema are generated under their grammar (``constrained_answer``)."""
    answer: Answer = {"type": question.type, "value": text, "text": text}
    if truncated:
        answer["truncated"] = True
    try:
        if question.type == "json":
            answer["value"] = parse_json(text)
    except AnswerError as exc:
        answer["value"] = None
        answer["error"] = {"code": exc.code, "message": exc.message}
    return answer


def constrained_answer(question: Question, text: str, constraint: Constraint, finished: bool) -> Answer:
    """An answer generated under its grammar: its value whenever the grammar was completed (or, at the end of
    the budget, what was generated is whole), else a ``truncated`` error; never text that does not parse."""
    answer: Answer = {"type": question.type, "value": None, "text": text}
    if constraint.failed is not None:
        answer["error"] = {"code": "constraint_failed", "message": f"the grammar failed: {constraint.failed}"}
    elif finished or constraint.accepting:
        try:
            answer["value"] = constrained_value(question, text)
        except ValueError as exc:
            answer["error"] = {"code": "value_out_of_range", "message": str(exc)}
    else:
        answer["truncated"] = True
        answer["error"] = {"code": "truncated",
                           "message": f"the answer ran out of its {question.token_budget} tokens before its "
                                      "schema was complete (raise max_tokens)"}
    return answer
