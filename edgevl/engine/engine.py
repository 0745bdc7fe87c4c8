"""The engine: all of a rule's questions about one image, answered from one encoding; and several images
answered together (the stream mode), each exactly as it would be alone."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from edgevl.config import DEFAULT_MAX_PIXELS
from edgevl.engine.answers import (
    NO_VARIANTS,
    YES_VARIANTS,
    choice_answer,
    constrained_answer,
    generated_answer,
    single_token_ids,
    yes_no_answer,
    yes_no_log_odds,
)
from edgevl.engine.decoding import (
    Branch,
    DecodeStats,
    PackedSequence,
    decode_branches,
    encode_prefix,
    prefill_branches,
    room_for,
    shift,
)
from edgevl.engine.grammar import Grammars
from edgevl.engine.loading import LoadedModel
from edgevl.engine.prompts import QuestionPrompt, build_prompt, continuation_ids, preprocess_image
from edgevl.engine.tuning import default_max_batch
from edgevl.errors import EdgevlError, ModelError
from edgevl.questions import Question
from edgevl.records import Answer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answered:
    answers: dict[str, Answer]
    encode_ms: float
    answer_ms: float
    image_tokens: int
    tokens: dict[str, list[int]]  # generated token ids of text, number and json answers
    # Uncalibrated scores of scored answers: yes_no [log-odds], choice [one per option].
    scores: dict[str, list[float]]
    decode_steps: int = 0
    decode_seconds: float = 0.0


@dataclass(frozen=True)
class Frame:
    """One image and what is asked of it."""

    image: Image.Image
    questions: Sequence[Question]
    max_pixels: int | None = None


@dataclass
class _Encoded:
    """A frame ready to decode: its branches prefilled in its own sequence."""

    index: int
    branches: list[Branch]
    encode_ms: float  # the image and the prefix
    prefill_ms: float  # its questions' suffixes and options
    image_tokens: int


class Engine:
    """Answers questions about images with a loaded Qwen3-VL."""

    def __init__(self, lm: LoadedModel, max_batch: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 on_progress: Callable[[], None] | None = None) -> None:
        self.lm = lm
        # Called after every forward pass: lets a supervisor tell a long job from a hung one.
        self.on_progress: Callable[[], None] = on_progress or (lambda: None)
        self.max_batch = max_batch or default_max_batch()
        self.max_pixels = max_pixels
        self.yes_ids = single_token_ids(lm.tokenizer, YES_VARIANTS)
        self.no_ids = single_token_ids(lm.tokenizer, NO_VARIANTS)
        if not self.yes_ids or not self.no_ids:
            raise ModelError("the tokenizer has no single-token yes/no answers", "model_unsupported")
        self._grammars: Grammars | None = None  # built with the first constrained question

    @property
    def grammars(self) -> Grammars:
        if self._grammars is None:
            end = self.lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
            vocab = int(self.lm.model.config.text_config.vocab_size)  # the rows of the logits
            self._grammars = Grammars(self.lm.tokenizer, vocab, end if isinstance(end, int) else min(self.lm.eos_ids))
        return self._grammars

    def answer(self, image: Image.Image, questions: Sequence[Question], max_pixels: int | None = None,
               force_full_length: bool = False) -> Answered:
        """Answer ``questions`` about ``image``; ``force_full_length`` (benchmark only) ignores end tokens."""
        result = self.answer_frames([Frame(image, questions, max_pixels)], force_full_length)[0]
        if isinstance(result, EdgevlError):
            raise result
        return result

    def answer_frames(self, frames: Sequence[Frame], force_full_length: bool = False) -> list[Answered | EdgevlError]:
        """Answer every frame's questions: each frame is encoded and its questions prefilled alone, then all
        frames' answers decode together, sharing every step.  A frame that fails before that gets its error and
        costs the others nothing.  The decode figures are the shared part's, the same for every frame."""
        results: list[Answered | EdgevlError | None] = [None] * len(frames)
        encoded: list[_Encoded] = []
        parts: list[PackedSequence] = []
        for index, frame in enumerate(frames):
            try:
                done, part = self._prefilled(index, frame, force_full_length)
            except EdgevlError as exc:
                results[index] = exc
                continue
            except MemoryError:
                raise
            except Exception as exc:  # what one frame meets costs that frame, as it would alone
                log.exception("a frame could not be encoded")
                results[index] = ModelError(f"{type(exc).__name__}: {exc}", "engine_failed")
                continue
            encoded.append(done)
            parts.append(part)
        if encoded:
            started = time.perf_counter()
            seq, offsets = PackedSequence.join(parts, [room_for(e.branches) for e in encoded])
            parts.clear()  # the joined cache holds the only copy now
            for e, offset in zip(encoded, offsets, strict=True):
                for branch in e.branches:
                    shift(branch, offset)
            stats = decode_branches(seq, [b for e in encoded for b in e.branches], self.max_batch)
            decode_ms = (time.perf_counter() - started) * 1000
            for e in encoded:
                results[e.index] = self._answered(frames[e.index].questions, e, decode_ms, stats)
        return [r for r in results if r is not None]

    def _prefilled(self, index: int, frame: Frame, force_full_length: bool) -> tuple[_Encoded, PackedSequence]:
        """The frame's image encoded and its questions prefilled, in a sequence of its own."""
        started = time.perf_counter()
        encoded = preprocess_image(self.lm, frame.image, frame.max_pixels or self.max_pixels)
        prompts = [build_prompt(self.lm, q.prompt_text(), encoded) for q in frame.questions]
        shared = prompts[0]
        if any(p.prefix_ids != shared.prefix_ids for p in prompts[1:]):
            raise ModelError("the chat template puts question text before the image", "model_unsupported")
        seq = encode_prefix(self.lm, encoded, shared.prefix_ids, shared.prefix_positions, self.on_progress)
        encoded_at = time.perf_counter()
        branches = [self.branch(q, p, force_full_length) for q, p in zip(frame.questions, prompts, strict=True)]
        prefill_branches(seq, branches)
        return _Encoded(index, branches, (encoded_at - started) * 1000, (time.perf_counter() - encoded_at) * 1000,
                        encoded.n_tokens), seq

    def _answered(self, questions: Sequence[Question], encoded: _Encoded, decode_ms: float,
                  stats: DecodeStats) -> Answered:
        pairs = list(zip(questions, encoded.branches, strict=True))
        scores = {q.id: self._scores(b) for q, b in pairs if b.kind != "generate"}
        answers = {q.id: self._answer(q, b, scores.get(q.id, [])) for q, b in pairs}
        tokens = {q.id: list(b.generated) for q, b in pairs if b.kind == "generate"}
        return Answered(answers, encoded.encode_ms, encoded.prefill_ms + decode_ms, encoded.image_tokens, tokens,
                        scores, stats.steps, stats.seconds)

    def branch(self, question: Question, prompt: QuestionPrompt, force_full_length: bool = False) -> Branch:
        """How ``question`` continues its image's prefix: scored next token, scored options, or generated."""
        if question.type == "yes_no":
            return Branch("next", prompt.suffix_ids, prompt.suffix_positions)
        if question.type == "choice":
            suffix_text = self.lm.tokenizer.decode(prompt.suffix_ids, skip_special_tokens=False)
            options = [continuation_ids(self.lm, suffix_text, option) for option in question.options]
            return Branch("choice", prompt.suffix_ids, prompt.suffix_positions, options=options)
        constraint = self.grammars.constraint(question) if question.grammar is not None else None
        return Branch("generate", prompt.suffix_ids, prompt.suffix_positions, max_new=question.token_budget,
                      ignore_eos=force_full_length and constraint is None, constraint=constraint)

    def _scores(self, branch: Branch) -> list[float]:
        if branch.kind == "next":
            assert branch.logprobs is not None
            return [yes_no_log_odds(branch.logprobs, self.yes_ids, self.no_ids)]
        return list(branch.scores)

    def _answer(self, question: Question, branch: Branch, scores: list[float]) -> Answer:
        if question.type == "yes_no":
            return yes_no_answer(question, scores[0])
        if question.type == "choice":
            return choice_answer(question, scores)
        tokens = [t for t in branch.generated if t not in self.lm.eos_ids]
        text = self.lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if branch.constraint is None:
            return generated_answer(question, text, truncated=not branch.finished_by_eos)
        return constrained_answer(question, text, branch.constraint, branch.finished_by_eos)
