"""What can be asked of an image: a question and the type of answer it expects."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AnswerType = Literal["text", "yes_no", "choice", "number", "json"]

DEFAULT_MAX_TOKENS: dict[str, int] = {"text": 64, "number": 16, "json": 128, "yes_no": 1, "choice": 1}

# Short instructions appended to typed questions so that a small model answers in
# the expected shape.  A ``text`` question is sent exactly as written.
TYPE_HINTS: dict[str, str] = {
    "yes_no": "Answer yes or no.",
    "number": "Answer with a number only.",
    "json": "Answer with JSON only.",
}


class Question(BaseModel):
    """One question of a rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
        default=None, ge=0.0, le=1.0, description="yes_no: `alarm` is true when P(yes) is above this."
    )

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
        if self.alarm_above is not None and self.type != "yes_no":
            raise ValueError("alarm_above is only for yes_no questions")
        if self.max_tokens is not None and self.type in ("yes_no", "choice"):
            raise ValueError(f"{self.type} answers are scored, not generated: max_tokens does not apply")
        return self

    @property
    def token_budget(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS[self.type]

    def prompt_text(self) -> str:
        """The user text sent to the model for this question."""
        if self.type == "choice":
            return f"{self.ask} Answer with one of: {', '.join(self.options)}."
        hint = TYPE_HINTS.get(self.type)
        return f"{self.ask} {hint}" if hint else self.ask
