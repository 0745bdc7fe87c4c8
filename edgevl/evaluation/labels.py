"""The labelled set: a folder of images and the right answers, as a spreadsheet can export them.

``labels.csv`` has a ``file`` column (relative to the folder) and one column per
question id of the rule; an empty cell is "not labelled".  ``labels.jsonl`` holds
one object per line with the same keys (null or absent: not labelled).  Every
problem is reported with its row, all at once, so that one pass over the file
fixes them: figures computed from wrong labels would mislead more than no figures.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevl.errors import ConfigError
from edgevl.questions import Question

LABEL_FILES = ("labels.csv", "labels.jsonl")
_YES = {"yes", "true", "1", "y"}
_NO = {"no", "false", "0", "n"}
# Spreadsheets in many locales export with semicolons or tabs.
_DELIMITERS = ",;\t"
MAX_LABEL_ROWS = 1_000_000


class LabelsError(ConfigError):
    """The labels file cannot be used; ``problems`` has one line per row at fault."""

    code = "labels_invalid"

    def __init__(self, source: Path, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:50]
        more = f"\n… and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__("\n".join(f"{source}:{p}" for p in shown) + more)


@dataclass(frozen=True)
class LabelledImage:
    file: str  # as the labels file names it
    path: Path
    row: int
    labels: dict[str, Any]  # question id -> the right answer, typed as the question's answer


@dataclass(frozen=True)
class LabelledSet:
    folder: Path
    source: Path
    images: tuple[LabelledImage, ...]

    def labelled(self, question_id: str) -> int:
        return sum(question_id in image.labels for image in self.images)


def find_labels(folder: Path) -> Path:
    found = [folder / name for name in LABEL_FILES if (folder / name).is_file()]
    if not found:
        raise ConfigError(f"{folder}: no labels.csv or labels.jsonl")
    if len(found) > 1:
        raise ConfigError(f"{folder}: both labels.csv and labels.jsonl; keep one")
    return found[0]


def parse_label(question: Question, raw: Any, from_text: bool) -> Any:
    """The label as a value of the question's answer type; ``ValueError`` says why it does not fit."""
    if question.type == "yes_no":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        word = str(raw).strip().lower() if isinstance(raw, str) else None
        if word in _YES:
            return True
        if word in _NO:
            return False
        raise ValueError(f"{raw!r} is not yes or no (yes/no, true/false, 1/0)")
    if question.type == "choice":
        if not isinstance(raw, str):
            raise ValueError(f"{raw!r} is not one of the options: {', '.join(question.options)}")
        text = raw.strip()
        if text in question.options:
            return text
        folded = [o for o in question.options if o.casefold() == text.casefold()]
        if len(folded) == 1:
            return folded[0]
        raise ValueError(f"{raw!r} is not one of the options: {', '.join(question.options)}")
    if question.type == "number":
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError(f"{raw!r} is not a number")
        try:
            value = float(raw.strip() if isinstance(raw, str) else raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{raw!r} is not a finite number")
        return value
    if question.type == "json":
        if not from_text:
            return raw
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(raw, str):
        raise ValueError(f"{raw!r} is not text")
    return raw.strip()


def _image_path(folder: Path, file: Any) -> Path:
    if not isinstance(file, str) or not file.strip():
        raise ValueError("the file is empty")
    relative = Path(file.strip())
    if relative.is_absolute():
        raise ValueError(f"{file!r} must be relative to the labelled folder")
    path = folder / relative
    try:
        if not path.resolve().is_relative_to(folder.resolve()):
            raise ValueError(f"{file!r} lies outside the labelled folder")
        if not path.is_file():
            raise ValueError(f"{file!r}: no such image in {folder}")
    except OSError as exc:  # a name too long, a loop of links: the file cannot be the image meant
        raise ValueError(f"{file!r}: {exc.strerror or exc}") from None
    return path


def _csv_rows(text: str) -> list[tuple[int, dict[str, Any]]]:
    header_line = text.split("\n", 1)[0]
    delimiter = max(_DELIMITERS, key=header_line.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = list(reader)
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    out: list[tuple[int, dict[str, Any]]] = [(1, {"__header__": header})]
    for number, cells in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(header):
            out.append((number, {"__problem__": f"{len(cells)} cells, but the header has {len(header)} columns"}))
            continue
        row = {name: cell for name, cell in zip(header, cells, strict=False) if cell.strip()}
        out.append((number, row))
    return out


def _jsonl_rows(text: str) -> list[tuple[int, dict[str, Any]]]:
    out: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            out.append((number, {"__problem__": f"not valid JSON ({exc.msg})"}))
            continue
        if not isinstance(row, dict):
            out.append((number, {"__problem__": "not a JSON object"}))
            continue
        out.append((number, {k: v for k, v in row.items() if v is not None}))
    return out


def load_labels(folder: Path, questions: tuple[Question, ...], source: Path | None = None) -> LabelledSet:
    """Read and check the labels of ``folder``; ``LabelsError`` lists every row at fault."""
    source = source or find_labels(folder)
    try:
        text = source.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read the labels: {exc}") from None
    by_id = {q.id: q for q in questions}
    from_text = source.suffix.lower() == ".csv"
    rows = _csv_rows(text) if from_text else _jsonl_rows(text)
    problems: list[str] = []
    if from_text:
        header = rows[0][1]["__header__"] if rows else []
        if "file" not in header:
            problems.append("1: no 'file' column")
        for name in header:
            if name != "file" and name not in by_id:
                problems.append(f"1: unknown question id {name!r} (the rule's questions: {', '.join(by_id)})")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            problems.append(f"1: repeated columns: {', '.join(dupes)}")
        rows = rows[1:]
    if len(rows) > MAX_LABEL_ROWS:
        raise LabelsError(source, [f"{len(rows)} rows; at most {MAX_LABEL_ROWS}"])
    images: list[LabelledImage] = []
    seen: dict[str, int] = {}
    for number, row in rows:
        if "__problem__" in row:
            problems.append(f"{number}: {row['__problem__']}")
            continue
        row_problems: list[str] = []
        try:
            path = _image_path(folder, row.get("file"))
        except ValueError as exc:
            row_problems.append(str(exc))
            path = None
        key = str(path.resolve()) if path else None
        if key is not None and key in seen:
            row_problems.append(f"{row['file']!r} is labelled again (first in row {seen[key]})")
        labels: dict[str, Any] = {}
        for name, raw in row.items():
            if name == "file":
                continue
            question = by_id.get(name)
            if question is None:
                if not from_text:
                    row_problems.append(f"unknown question id {name!r} (the rule's questions: {', '.join(by_id)})")
                continue
            try:
                labels[name] = parse_label(question, raw, from_text)
            except ValueError as exc:
                row_problems.append(f"{name}: {exc}")
        if row_problems:
            problems.append(f"{number}: " + "; ".join(row_problems))
            continue
        assert path is not None
        assert key is not None
        seen[key] = number
        images.append(LabelledImage(str(row["file"]).strip(), path, number, labels))
    if problems:
        raise LabelsError(source, problems)
    if not images:
        raise ConfigError(f"{source}: no labelled images")
    return LabelledSet(folder, source, tuple(images))
