"""Answers constrained to a grammar: a ``json`` question with a schema, and every ``number`` question.

The grammar (compiled by llguidance from a JSON Schema) decides which tokens may
come next; every other token's log-probability is set to minus infinity before
the greedy choice.  A constrained answer is therefore what ``generate()`` gives
with the same mask as a logits processor, and it always parses: it either
completes its grammar or runs out of tokens (``truncated``).  Each grammar is
compiled once per engine, and every answer starts from a copy of the compiled
matcher.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

from edgevl.questions import Question


class Constraint:
    """One answer's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """The tokens the grammar allows next: a bool mask over the model's vocabulary."""
        # One bit per tokenizer token; the model's rows beyond the tokenizer (padding) are never allowed.
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), count=self.vocab_size,
                             bitorder="little")
        return torch.from_numpy(bits.view(np.bool_))

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """The grammar allows nothing more than the end of the answer."""
        return bool(self.matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """What was generated is a whole answer (it may go on: a number can take more digits)."""
        return bool(self.matcher.is_accepting())

    @property
    def failed(self) -> str | None:
        return str(self.matcher.get_error()) if self.matcher.is_error() else None


class Grammars:
    """The constraints of one model's answers, each grammar compiled once."""

    def __init__(self, tokenizer: Any, vocab_size: int, end_of_answer: int) -> None:
        import llguidance.hf

        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=end_of_answer)
        self._compiled: dict[str, Any] = {}

    def constraint(self, question: Question) -> Constraint | None:
        """A fresh constraint for an answer to ``question``; None when its answers are free text."""
        grammar = question.grammar
        if grammar is None:
            return None
        pristine = self._compiled.get(grammar)
        if pristine is None:
            from llguidance import LLMatcher

            pristine = LLMatcher(self.tokenizer, grammar, log_level=0)
            if pristine.is_error():
                # The rules loader compiled it already; only a tokenizer that cannot spell it gets here.
                raise ValueError(f"question {question.id}: the schema cannot be used with this model's "
                                 f"tokenizer: {pristine.get_error()}")
            self._compiled[grammar] = pristine
        return Constraint(pristine.deep_copy(), self.vocab_size)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond the range of a number")
    return value


def constrained_value(question: Question, text: str) -> Any:
    """The value of a complete constrained answer.  The grammar makes it parse; a number too large for a
    float (``1e999``) is still refused, since records must stay valid JSON.  ``ValueError`` otherwise."""
    value = json.loads(text, parse_float=_finite)
    if question.type == "number":
        try:
            return _finite(str(float(value)))
        except OverflowError:
            raise ValueError(f"{text} is beyond the range of a number") from None
    return value
