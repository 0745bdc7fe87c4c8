"""The engine: all of a rule's questions about one image, answered from one encoding."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from edgevl.engine.answers import (
    NO_VARIANTS,
    YES_VARIANTS,
    choice_answer,
    generated_answer,
    single_token_ids,
    yes_no_answer,
)
from edgevl.engine.decoding import Row, encode_prefix, run_rows
from edgevl.engine.loading import LoadedModel
from edgevl.engine.prompts import QuestionPrompt, build_prompt, continuation_ids, preprocess_image
from edgevl.engine.tuning import default_max_batch
from edgevl.errors import ModelError
from edgevl.questions import Question

DEFAULT_MAX_PIXELS = 448 * 448


@dataclass(frozen=True)
class Answered:
    answers: dict[str, dict[str, Any]]
    encode_ms: float
    answer_ms: float
    image_tokens: int
    tokens: dict[str, list[int]]  # generated token ids of text, number and json answers


class Engine:
    """Answers questions about images with a loaded Qwen3-VL."""

    def __init__(self, lm: LoadedModel, max_batch: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.lm = lm
        self.max_batch = max_batch or default_max_batch()
        self.max_pixels = max_pixels
        self.yes_ids = single_token_ids(lm.tokenizer, YES_VARIANTS)
        self.no_ids = single_token_ids(lm.tokenizer, NO_VARIANTS)
        if not self.yes_ids or not self.no_ids:
            raise ModelError("the tokenizer has no single-token yes/no answers", "model_unsupported")

    def answer(self, image: Image.Image, questions: Sequence[Question], max_pixels: int | None = None) -> Answered:
        started = time.perf_counter()
        encoded = preprocess_image(self.lm, image, max_pixels or self.max_pixels)
        prompts = [build_prompt(self.lm, q.prompt_text(), encoded) for q in questions]
        shared = prompts[0]
        if any(p.prefix_ids != shared.prefix_ids for p in prompts[1:]):
            raise ModelError("the chat template puts question text before the image", "model_unsupported")
        prefix = encode_prefix(self.lm, encoded, shared.prefix_ids, shared.prefix_positions)
        encoded_at = time.perf_counter()

        rows_by_question = [self._rows(q, p) for q, p in zip(questions, prompts, strict=True)]
        run_rows(self.lm, prefix, [r for rows in rows_by_question for r in rows], self.max_batch)
        answers = {q.id: self._answer(q, rows) for q, rows in zip(questions, rows_by_question, strict=True)}
        tokens = {
            q.id: list(rows[0].generated)
            for q, rows in zip(questions, rows_by_question, strict=True)
            if rows[0].kind == "generate"
        }
        done = time.perf_counter()
        return Answered(answers, (encoded_at - started) * 1000, (done - encoded_at) * 1000, encoded.n_tokens, tokens)

    def _rows(self, question: Question, prompt: QuestionPrompt) -> list[Row]:
        if question.type == "yes_no":
            return [Row(prompt.suffix_ids, prompt.suffix_positions, "next")]
        if question.type == "choice":
            suffix_text = self.lm.tokenizer.decode(prompt.suffix_ids, skip_special_tokens=False)
            rows = []
            last = int(prompt.suffix_positions[0, -1])
            for option in question.options:
                extra = continuation_ids(self.lm, suffix_text, option)
                tail = torch.arange(last + 1, last + 1 + len(extra)).view(1, -1).expand(3, -1)
                rows.append(
                    Row(
                        prompt.suffix_ids + extra,
                        torch.cat([prompt.suffix_positions, tail], dim=1),
                        "sequence",
                        score_from=len(prompt.suffix_ids),
                    )
                )
            return rows
        return [Row(prompt.suffix_ids, prompt.suffix_positions, "generate", max_new=question.token_budget)]

    def _answer(self, question: Question, rows: list[Row]) -> dict[str, Any]:
        if question.type == "yes_no":
            assert rows[0].logprobs is not None
            return yes_no_answer(question, rows[0].logprobs, self.yes_ids, self.no_ids)
        if question.type == "choice":
            return choice_answer(question, [r.score for r in rows])
        row = rows[0]
        tokens = [t for t in row.generated if t not in self.lm.eos_ids]
        text = self.lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return generated_answer(question, text, truncated=not row.finished_by_eos)
