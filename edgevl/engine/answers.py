"""Turning model output into typed answers a machine can act on."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import torch

from edgevl.errors import AnswerError
from edgevl.questions import Question
from edgevl.records import Answer

YES_VARIANTS = ("Yes", "yes", "YES", " Yes", " yes", " YES")
NO_VARIANTS = ("No", "no", "NO", " No", " no", " NO")

_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d+)?|[.,]\d+)(?:[eE][-+]?\d+)?")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


def single_token_ids(tokenizer: Any, variants: tuple[str, ...]) -> list[int]:
    """Ids of the variants that are one token each (the model's first answer token)."""
    ids: set[int] = set()
    for text in variants:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.add(int(encoded[0]))
    return sorted(ids)


def yes_no_answer(question: Question, logprobs: torch.Tensor, yes_ids: list[int], no_ids: list[int]) -> Answer:
    yes = torch.logsumexp(logprobs[yes_ids], dim=0)
    no = torch.logsumexp(logprobs[no_ids], dim=0)
    confidence = float(torch.exp(yes - torch.logaddexp(yes, no)))
    answer: Answer = {
        "type": "yes_no",
        "value": confidence >= 0.5,
        "confidence": round(confidence, 6),
        "text": "yes" if confidence >= 0.5 else "no",
    }
    if question.alarm_above is not None:
        answer["alarm"] = confidence > question.alarm_above
    return answer


def choice_answer(question: Question, scores: list[float]) -> Answer:
    probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0).tolist()
    best = max(range(len(scores)), key=lambda i: scores[i])
    return {
        "type": "choice",
        "value": question.options[best],
        "confidence": round(probs[best], 6),
        "probabilities": {o: round(p, 6) for o, p in zip(question.options, probs, strict=True)},
        "text": question.options[best],
    }


def parse_number(text: str) -> float:
    match = _THOUSANDS.search(text)
    if match:
        return float(match.group(0).replace(",", ""))
    match = _NUMBER.search(text)
    if not match:
        raise AnswerError(f"no number in the answer {text!r}", "number_not_found")
    value = float(match.group(0).replace(",", "."))
    if not math.isfinite(value):
        raise AnswerError(f"the number in {text!r} is not finite", "number_not_found")
    return value


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
    answer: Answer = {"type": question.type, "value": text, "text": text}
    if truncated:
        answer["truncated"] = True
    try:
        if question.type == "number":
            answer["value"] = parse_number(text)
        elif question.type == "json":
            answer["value"] = parse_json(text)
    except AnswerError as exc:
        answer["value"] = None
        answer["error"] = {"code": exc.code, "message": exc.message}
    return answer
