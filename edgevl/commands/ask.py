"""``edgevl ask``: answer questions about image files from the command line."""

from __future__ import annotations

import difflib
import logging
import re
import sys
from pathlib import Path

from pydantic import ValidationError

from edgevl.config import DEFAULT_MAX_PIXELS, Precision, default_device_id
from edgevl.engine.engine import Engine
from edgevl.engine.loading import load_model
from edgevl.engine.pipeline import Asked, answer_inputs
from edgevl.engine.tuning import default_max_frames
from edgevl.errors import ConfigError
from edgevl.questions import Question
from edgevl.records import Job, Record, Source, is_error, to_json, with_questions
from edgevl.rules import Rule, load_rules
from edgevl.worker.footprint import frames_of

log = logging.getLogger(__name__)

_TYPED = re.compile(r"^(?P<type>text|yes_no|number|json|choice\((?P<options>[^)]*)\))\s*:\s*(?P<ask>.+)$", re.DOTALL)
# "word: ..." where the word looks like a type that is not one: a typo, not a question about a "yesno".
_TYPE_LIKE = re.compile(r"^(?P<word>[A-Za-z_-]+)(?P<paren>\(.*?\))?\s*:")
TYPES = ("text", "yes_no", "number", "json", "choice")


def parse_question(index: int, text: str) -> Question:
    """``-q`` syntax: ``QUESTION``, ``TYPE: QUESTION`` or ``choice(A|B|C): QUESTION``."""
    match = _TYPED.match(text.strip())
    if not match:
        _refuse_unknown_type(text)
    try:
        if not match:
            return Question(id=f"q{index}", ask=text.strip(), type="text")
        kind = match.group("type")
        if kind.startswith("choice"):
            options = tuple(o.strip() for o in (match.group("options") or "").split("|"))
            return Question(id=f"q{index}", ask=match.group("ask"), type="choice", options=options)
        return Question.model_validate({"id": f"q{index}", "ask": match.group("ask"), "type": kind})
    except ValidationError as exc:
        raise ConfigError(f"question {text!r}: {exc.errors()[0]['msg']}") from None


def _refuse_unknown_type(text: str) -> None:
    like = _TYPE_LIKE.match(text.strip())
    if not like:
        return
    word = like.group("word").lower()
    close = difflib.get_close_matches(word.replace("-", "_"), TYPES, n=1, cutoff=0.6)
    if like.group("paren") or close or word in ("bool", "boolean", "int", "float", "enum", "yesno"):
        hint = f' — did you mean "{close[0]}"?' if close else ""
        raise ConfigError(f"question {text.strip()!r}: unknown answer type {like.group('word')!r}{hint} "
                          "(types: text, yes_no, number, json, choice(A|B|…); for a text question that starts "
                          "with such a word, write 'text: …')")


def ask_rule(args_questions: list[str], rules: Path | None, rule_name: str | None) -> Rule:
    if rules is not None or rule_name is not None:
        if rules is None or rule_name is None:
            raise ConfigError("--rules and --rule go together")
        if args_questions:
            raise ConfigError("give either -q questions or --rules/--rule, not both")
        return load_rules(rules).get(rule_name)
    if not args_questions:
        raise ConfigError("no questions: give -q QUESTION or --rules FILE --rule NAME")
    questions = tuple(parse_question(i + 1, q) for i, q in enumerate(args_questions))
    return Rule.model_validate({"name": "cli", "question": questions})


def run_ask(images: list[Path], questions: list[str], rules: Path | None, rule_name: str | None, model: str,
            precision: Precision, max_pixels: int | None, threads: int, max_batch: int, max_frames: int = 0) -> int:
    """One record per image on stdout, in order; up to ``max_frames`` images answered together as the daemon's
    stream mode does (0: from the core count; 1: each alone)."""
    if max_frames < 0:
        raise ConfigError("--max-frames is 0 (from the core count), 1 (each image alone) or more")
    rule = ask_rule(questions, rules, rule_name)
    questions_from_rules = rules is not None
    lm = load_model(model, precision, threads)
    engine = Engine(lm, max_batch=max_batch, max_pixels=DEFAULT_MAX_PIXELS)
    device = default_device_id()
    frames = max_frames or default_max_frames()
    # A document's pages share the passes as the daemon's would: as many as fit the frames at their pixels.
    asked = Asked.of(rule, max_pixels, frames // frames_of(max_pixels or rule.max_pixels, DEFAULT_MAX_PIXELS))
    failed = 0
    for first in range(0, len(images), frames):
        chunk = images[first: first + frames]
        records: dict[int, Record] = {}
        inputs: list[tuple[int, Job, bytes]] = []
        for index, path in enumerate(chunk):
            job = Job(rule=rule.name, source=Source(kind="cli", path=str(path.resolve())), device_id=device)
            try:
                inputs.append((index, job, path.read_bytes()))
            except OSError as exc:
                records[index] = job.error("file_unreadable", f"cannot read {path}: {exc.strerror or exc}")
        answered = answer_inputs(engine, [(job, data, asked) for _, job, data in inputs])
        records.update({index: record for (index, _, _), record in zip(inputs, answered, strict=True)})
        for index, path in enumerate(chunk):
            record = records[index]
            if not questions_from_rules:
                record = with_questions(record, {q.id: q.ask for q in rule.questions})
            print(to_json(record), flush=True)
            if is_error(record):
                failed += 1
                log.info("%s: failed: %s", path, record["error"]["code"])
            else:
                log.info("%s: answered in %.0f ms", path, record["timings_ms"].get("total", 0.0))
    if failed:
        print(f"{failed} of {len(images)} images failed", file=sys.stderr)
    return 1 if failed else 0
