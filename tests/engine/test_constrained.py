"""Answers held to a grammar: always valid, and exactly generate() with the same constraint as a logits
processor, while sharing the image's prefix and forward passes with unconstrained questions."""

from __future__ import annotations

import random
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from llguidance import LLMatcher
from transformers import LogitsProcessor, LogitsProcessorList

from edgevl.engine.engine import Engine
from edgevl.questions import Question
from tests.engine.test_exactness import _full_inputs
from tests.harness.images import noise_image


class GrammarProcessor(LogitsProcessor):  # type: ignore[misc]
    """The constraint as generate() takes it, written apart from the engine: every token the grammar does not
    allow next gets minus infinity."""

    def __init__(self, engine: Engine, question: Question, prompt_length: int) -> None:
        self.matcher = LLMatcher(engine.grammars.tokenizer, question.grammar)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[0, self.prompt_length:].tolist()
        if generated:
            assert self.matcher.consume_token(generated[-1])
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
        n = min(bits.size, scores.shape[-1])
        allowed[:n] = torch.from_numpy(bits[:n].astype(bool))
        return scores.masked_fill(~allowed, float("-inf"))


SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"invoice": {"type": "string", "maxLength": 8},
                                      "total": {"type": "integer", "minimum": 0, "maximum": 99999},
                                      "paid": {"type": "boolean"}},
     "required": ["invoice", "total", "paid"]},
    {"type": "array", "items": {"type": "string", "enum": ["ok", "scratch", "dent"]}, "maxItems": 3},
]


def _reference(engine: Engine, question: Question, image: Any, max_pixels: int) -> list[int]:
    lm = engine.lm
    inputs = _full_inputs(lm, question.prompt_text(), image, max_pixels)
    length = inputs["input_ids"].shape[1]
    processors = LogitsProcessorList([GrammarProcessor(engine, question, length)]) if question.grammar else None
    out = lm.model.generate(**inputs, max_new_tokens=question.token_budget, do_sample=False,
                            logits_processor=processors)
    return list(out[0, length:].tolist())


def _without_end(tokens: list[int], eos: frozenset[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


def test_constrained_answers_equal_generate_with_the_constraint_as_a_logits_processor(fp32_model) -> None:  # type: ignore[no-untyped-def]
    image = noise_image(200, 150, seed=5)
    questions = [
        Question.model_validate({"id": "fields", "ask": "Extract the invoice.", "type": "json", "max_tokens": 60,
                                 "schema": SCHEMAS[0]}),
        Question(id="free", ask="Read the label.", type="text", max_tokens=9),
        Question.model_validate({"id": "defects", "ask": "List the defects.", "type": "json", "max_tokens": 40,
                                 "schema": SCHEMAS[1]}),
        Question(id="count", ask="How many screws?", type="number", max_tokens=8),
        Question(id="raw", ask="Give JSON.", type="json", max_tokens=7),  # no schema: free text
    ]
    engine = Engine(fp32_model, max_batch=3)  # fewer rows than branches: constrained rows share passes
    answered = engine.answer(image, questions, 64 * 64 * 4)
    for q in questions:
        reference = _reference(engine, q, image, 64 * 64 * 4)
        if q.grammar is None:
            assert answered.tokens[q.id] == reference, q.id
        else:
            # A completed grammar ends the answer without spending a pass on the end token it forces.
            assert _without_end(answered.tokens[q.id], fp32_model.eos_ids) == _without_end(reference,
                                                                                            fp32_model.eos_ids), q.id
    fields = answered.answers["fields"]
    jsonschema.validate(fields["value"], SCHEMAS[0])
    assert isinstance(answered.answers["count"]["value"], float)
    assert answered.answers["free"]["value"] == answered.answers["free"]["text"]


def _random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A schema of the supported subset whose every answer is bounded in length."""
    kinds = ["string", "integer", "boolean", "enum", "null"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 6)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["red", "green", "blue", "none", "A-1", "ß"], rng.randint(1, 4))}
    if kind == "object":
        names = rng.sample(["id", "name", "qty", "ok", "zone", "lot"], rng.randint(1, 3))
        props = {n: _random_schema(rng, depth + 1) for n in names}
        return {"type": "object", "properties": props, "required": rng.sample(names, rng.randint(0, len(names)))}
    if kind == "array":
        return {"type": "array", "items": _random_schema(rng, depth + 1), "maxItems": rng.randint(1, 3)}
    return {"type": kind}


def test_constrained_answers_validate_on_many_pages_and_schemas(fp32_model) -> None:  # type: ignore[no-untyped-def]
    """The random-weight model never writes valid JSON on its own: every answer validating is the constraint's
    work."""
    rng = random.Random(7)
    engine = Engine(fp32_model, max_batch=8)
    validated = 0
    for page in range(24):
        schemas = [_random_schema(rng) for _ in range(2)]
        questions = [Question.model_validate({"id": f"s{i}", "ask": "Extract the fields.", "type": "json",
                                              "max_tokens": 200, "schema": s}) for i, s in enumerate(schemas)]
        unconstrained = Question(id="free", ask="Extract the fields as JSON.", type="json", max_tokens=24)
        answered = engine.answer(noise_image(96, 128, seed=100 + page), [*questions, unconstrained], 64 * 64 * 4)
        for q, schema in zip(questions, schemas, strict=True):
            answer = answered.answers[q.id]
            assert "error" not in answer, (schema, answer)
            jsonschema.validate(answer["value"], schema)
            if schema.get("type") == "object":
                assert set(answer["value"]) <= set(schema["properties"]), "keys the schema does not list"
            validated += 1
    assert validated >= 40


def test_an_answer_that_runs_out_of_tokens_is_a_truncated_error_not_invalid_json(fp32_model) -> None:  # type: ignore[no-untyped-def]
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 30, "maxLength": 40}},
              "required": ["text"]}
    question = Question.model_validate({"id": "long", "ask": "Transcribe.", "type": "json", "max_tokens": 5,
                                        "schema": schema})
    answer = Engine(fp32_model).answer(noise_image(64, 64, seed=1), [question], 64 * 64 * 4).answers["long"]
    assert answer["value"] is None
    assert answer["truncated"] is True
    assert answer["error"]["code"] == "truncated"


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "object", "patternProperties": {}}, "patternProperties not supported"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "cannot be compiled"),
    ({"type": "decimal"}, "type must be one of"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "required lists"),
])
def test_schemas_outside_the_subset_or_that_cannot_compile_are_refused(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Question.model_validate({"id": "q", "ask": "a", "type": "json", "schema": schema})
    with pytest.raises(ValueError, match="schema is for json questions"):
        Question.model_validate({"id": "q", "ask": "a", "type": "text", "schema": {"type": "string"}})
