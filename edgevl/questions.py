"""What can be asked of an image: a question and the type of answer it expects."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgevl.schemas import NUMBER_SCHEMA, check_schema, grammar_for

AnswerType = Literal["text", "yes_no", "choice", "number", "json"]

DEFAULT_MAX_TOKENS: dict[str, int] = {"text": 64, "number": 16, "json": 128, "yes_no": 1, "choice": 1}

# Short instructions appended to typed questions so that a small model answers in
# the expected shape.  A ``text`` question is sent exactly as written.
TYPE_HINTS: dict[str, str] = {
    "yes_no": "Answer yes or no.",
    "number": "Answer with a number only.",
    "json": "Answer with JSON only.",
}


class Calibration(BaseModel):
    """A fitted map from the model's raw scores to probabilities that match observed frequencies.

    ``edgevl eval --calibrate`` fits it on labelled frames.  yes_no: Platt scaling,
    P(yes) = sigmoid(slope × log-odds + offset), where log-odds = log P(yes) − log P(no)
    from the model.  choice: a temperature dividing the option scores before the softmax.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    slope: float | None = Field(default=None, gt=0.0, le=1000.0,
                                description="yes_no: multiplies the model's yes-vs-no log-odds.")
    offset: float | None = Field(default=None, ge=-1000.0, le=1000.0,
                                 description="yes_no: added to the scaled log-odds.")
    temperature: float | None = Field(default=None, gt=0.0, le=1000.0,
                                      description="choice: divides the option scores before the softmax.")
    labels: int | None = Field(default=None, ge=0, description="How many labelled frames it was fitted on.")

    def p_yes(self, log_odds: float) -> float:
        assert self.slope is not None
        assert self.offset is not None
        return sigmoid(self.slope * log_odds + self.offset)

    def option_probabilities(self, scores: Sequence[float]) -> list[float]:
        assert self.temperature is not None
        return softmax([s / self.temperature for s in scores])


def sigmoid(x: float) -> float:
    # Written for both signs so that large |x| neither overflows nor loses the small tail.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


class Question(BaseModel):
    """One question of a rule."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: str = Field(
        description="Key of the answer in the result record and in MQTT topics.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
    )
    ask: str = Field(description="The question put to the model.", min_length=1, max_length=4000)
    type: AnswerType = Field(
        default="text",
        description="text: free text; yes_no: true/false with P(yes); choice: one of `options`; "
        "number: a float parsed from the answer; json: the answer parsed as JSON.",
    )
    max_tokens: int | None = Field(
        default=None, ge=1, le=2048, description="Most tokens generated for text, number and json answers."
    )
    options: tuple[str, ...] = Field(
        default=(), description="The possible answers of a choice question (at least two)."
    )
    alarm_above: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="yes_no: `alarm` is true when P(yes) (calibrated, when the question is) is above this.",
    )
    unit: str | None = Field(
        default=None, min_length=1, max_length=32,
        description='number: the unit of the value, e.g. "mm" (Home Assistant\'s unit_of_measurement).')
    calibration: Calibration | None = Field(
        default=None,
        description="yes_no: {slope, offset}; choice: {temperature}. Written by `edgevl eval --calibrate --write`.",
    )
    json_schema: dict[str, Any] | None = Field(
        default=None, alias="schema",
        description="json: a JSON Schema the answer is held to while it is generated (object, array, string, "
                    "number, integer, boolean, null; properties, required, additionalProperties, items, "
                    "minItems, maxItems, minLength, maxLength, minimum, maximum, enum). The answer always "
                    "parses and follows it, or is cut short with a truncated error. An object takes only the "
                    "keys it lists unless additionalProperties says otherwise.")
    schema_file: Path | None = Field(
        default=None,
        description="json: a file holding the schema as JSON, relative to the rules file (instead of schema).")

    @model_validator(mode="after")
    def _check_type_fields(self) -> Question:
        if self.type == "choice":
            if len(self.options) < 2:
                raise ValueError("a choice question needs at least two options")
            if len(set(self.options)) != len(self.options):
                raise ValueError("choice options must be distinct")
            if any(not o.strip() for o in self.options):
                raise ValueError("choice options must not be empty")
        elif self.options:
            raise ValueError(f"options are only for choice questions, not {self.type}")
        if self.unit is not None and self.type != "number":
            raise ValueError(f"unit is only for number questions, not {self.type}")
        if self.alarm_above is not None and self.type != "yes_no":
            raise ValueError("alarm_above is only for yes_no questions")
        if self.calibration is not None:
            c = self.calibration
            if self.type == "yes_no" and (c.slope is None or c.offset is None or c.temperature is not None):
                raise ValueError("a yes_no calibration is {slope, offset}")
            if self.type == "choice" and (c.temperature is None or c.slope is not None or c.offset is not None):
                raise ValueError("a choice calibration is {temperature}")
            if self.type not in ("yes_no", "choice"):
                raise ValueError(f"calibration is for yes_no and choice questions, not {self.type}")
        if self.schema_file is not None and self.json_schema is None:
            raise ValueError("schema_file is read by the rules file's loader; here give the schema itself")
        if self.json_schema is not None:
            if self.type != "json":
                raise ValueError(f"schema is for json questions, not {self.type}")
            check_schema(self.json_schema)
            grammar_for(self.schema_text)
        if self.max_tokens is not None and self.type in ("yes_no", "choice"):
            raise ValueError(f"{self.type} answers are scored, not generated: max_tokens does not apply")
        return self

    @property
    def schema_text(self) -> str:
        """The schema as compact JSON text: the key its compiled grammar is cached under."""
        return json.dumps(self.json_schema, separators=(",", ":"))  # key order kept: it is the answer's order

    @property
    def grammar(self) -> str | None:
        """The grammar its answer is generated under: a json question's schema, a number; None for free text."""
        if self.type == "number":
            return grammar_for(json.dumps(NUMBER_SCHEMA))
        if self.json_schema is not None:
            return grammar_for(self.schema_text)
        return None

    @property
    def token_budget(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS[self.type]

    def prompt_text(self) -> str:
        """The user text sent to the model for this question."""
        if self.type == "choice":
            return f"{self.ask} Answer with one of: {', '.join(self.options)}."
        hint = TYPE_HINTS.get(self.type)
        return f"{self.ask} {hint}" if hint else self.ask
