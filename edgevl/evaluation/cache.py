"""Answers already computed by ``edgevl eval``, kept so that no finished image is answered twice.

One JSON line per image, appended and fsynced as soon as the image is answered: a
rerun after Ctrl-C or kill -9, or for another precision, redoes only what is
missing.  The key is the image's content, the model's files, the precision and
the rule's version (what is asked, not how answers are calibrated or alarmed), so
relabelling or recalibrating never asks the model again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypedDict

from edgevl.errors import ConfigError
from edgevl.records import Answer, ErrorInfo
from edgevl.rules import Rule

log = logging.getLogger(__name__)


class CachedAnswers(TypedDict):
    """One image's outcome: its answers and raw scores, or the error that ended it."""

    key: str
    seconds: float
    answers: dict[str, Answer]
    scores: dict[str, list[float]]
    error: ErrorInfo | None


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def rule_version(rule: Rule, max_pixels: int) -> str:
    """What changes the model's answers: the questions as asked (with the grammar a constrained answer is
    generated under), the crop and the resolution used."""
    asked = []
    for q in rule.questions:
        fields = q.model_dump(include={"id", "ask", "type", "options", "max_tokens"})
        if q.grammar is not None:  # only then: answers cached for free questions stay valid
            fields["grammar"] = q.grammar
        asked.append(fields)
    return _digest({"questions": asked, "crop": rule.crop, "max_pixels": rule.max_pixels or max_pixels})[:16]


def answer_key(image_sha256: str, precision: str, rule: str, model: str) -> str:
    return _digest([image_sha256, precision, rule, model])


class AnswerCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, CachedAnswers] = {}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                self._entries = dict(self._read(path.read_bytes().splitlines()))
            self._file = path.open("ab")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot use the answer cache: {exc.strerror or exc}") from None

    @staticmethod
    def _read(lines: Iterable[bytes]) -> Iterable[tuple[str, CachedAnswers]]:
        for line in lines:
            try:
                entry = json.loads(line)
                yield entry["key"], entry
            except (ValueError, KeyError, TypeError):
                # A line torn by a kill mid-write, or damaged: that image is answered again.
                log.debug("answer cache: skipping a damaged line")

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedAnswers | None:
        return self._entries.get(key)

    def put(self, entry: CachedAnswers) -> None:
        # A torn last line from an earlier kill would swallow this one: start on a line of its own.
        self._file.write(b"\n" + json.dumps(entry, ensure_ascii=False).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._entries[entry["key"]] = entry

    def close(self) -> None:
        self._file.close()
