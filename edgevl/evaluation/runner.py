"""Answering every labelled image with one precision, through the daemon's own image pipeline."""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from edgevl.config import DEFAULT_MAX_PIXELS, Precision
from edgevl.engine.model_files import model_version, resolve_model_path
from edgevl.errors import InputError
from edgevl.evaluation.cache import AnswerCache, CachedAnswers, answer_key, rule_version
from edgevl.evaluation.labels import LabelledSet
from edgevl.fsutil import read_regular
from edgevl.records import ErrorInfo, Job, Record, Source, is_error
from edgevl.rules import Rule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    file: str
    answered: CachedAnswers
    cached: bool


def uncalibrated(rule: Rule) -> Rule:
    """The rule as the model answers it: calibration and alarms are applied by the evaluation itself."""
    questions = tuple(q.model_copy(update={"calibration": None, "alarm_above": None}) for q in rule.questions)
    return rule.model_copy(update={"questions": questions})


def _read(path: Path, rule: Rule) -> bytes:
    """The image's bytes as the daemon would take them: a regular file (links followed: a labelled set
    often links frames from an archive), at most the rule's ``max_bytes``."""
    try:
        return read_regular(path, rule.max_bytes, follow_symlinks=True)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}", "file_unreadable") from None


def answer_set(labelled: LabelledSet, rule: Rule, model: str, precision: Precision, threads: int,
               cache: AnswerCache, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Outcome]:
    """Every image's outcome; those in ``cache`` are taken from it, the others answered and added to it.

    ``max_pixels`` is the model's default resolution, which a rule's own ``max_pixels`` overrides, as
    in the daemon.
    """
    bare = uncalibrated(rule)
    versions = (rule_version(bare, max_pixels), model_version(resolve_model_path(model)))
    keys: list[str | None] = []
    done: dict[int, CachedAnswers] = {}
    for i, image in enumerate(labelled.images):
        try:
            digest = hashlib.sha256(_read(image.path, rule)).hexdigest()
        except InputError as exc:
            # Never cached: the file may be fixed before the next run.
            keys.append(None)
            done[i] = CachedAnswers(key="", seconds=0.0, answers={}, scores={},
                                    error=ErrorInfo(code=exc.code, message=exc.message))
            continue
        key = answer_key(digest, precision, *versions)
        keys.append(key)
        entry = cache.get(key)
        if entry is not None:
            done[i] = entry
    missing = [i for i in range(len(keys)) if keys[i] is not None and i not in done]
    log.info("%s: %d of %d images already answered, %d cannot be read", precision,
             sum(keys[i] is not None for i in done), len(keys), keys.count(None))
    if missing:
        from edgevl.engine.engine import Engine
        from edgevl.engine.loading import load_model
        from edgevl.engine.pipeline import run_image

        lm = load_model(model, precision, threads)
        engine = Engine(lm, max_pixels=max_pixels)
        for i in tqdm(missing, desc=precision, unit="image", file=sys.stderr, disable=None):
            image = labelled.images[i]
            started = time.perf_counter()
            job = Job(rule=rule.name, source=Source(kind="cli", path=str(image.path)))
            record: Record
            try:
                data = _read(image.path, rule)
            except InputError as exc:
                record, answered = job.error(exc.code, exc.message), None
            else:
                record, answered = run_image(engine, job, data, bare.questions, bare.crop, bare.max_pixels)
            entry = CachedAnswers(key=keys[i] or "", seconds=time.perf_counter() - started, answers={}, scores={},
                                  error=None)
            if is_error(record):
                entry["error"] = record["error"]
            else:
                assert answered is not None
                entry["answers"] = record["answers"]
                entry["scores"] = answered.scores
            cache.put(entry)
            done[i] = entry
    fresh = set(missing)
    return [Outcome(image.file, done[i], cached=i not in fresh) for i, image in enumerate(labelled.images)]
