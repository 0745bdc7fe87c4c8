"""The rules file: which questions are asked of which images."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator

from edgevl.errors import ConfigError, format_validation_error
from edgevl.questions import Question


def topic_filter_problem(topic: str) -> str | None:
    """Why ``topic`` is not a valid MQTT subscription filter, or None."""
    if not topic or len(topic.encode()) > 65535 or "\x00" in topic:
        return "not a valid MQTT topic"
    if topic.startswith("$share/"):
        return "shared subscriptions are set with mqtt.share_group, not in the rules"
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


class Rule(BaseModel):
    """A named set of questions and the inputs whose images they are asked of."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(description="Rule name; results go under results/<name>/.",
                      pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    folders: tuple[Path, ...] = Field(default=(), description="Watched folders whose images this rule answers.")
    patterns: tuple[str, ...] = Field(
        default=("*.jpg", "*.jpeg", "*.png", "*.webp", "*.bmp", "*.tif", "*.tiff", "*.gif", "*.pdf"),
        description="File name patterns (case-insensitive) taken from the folders.",
    )
    recursive: bool = Field(default=False, description="Also watch the folders' subfolders.")
    missing_folders: Literal["refuse", "create", "wait"] = Field(
        default="refuse",
        description='A watched folder that does not exist: "refuse" (check and run name it and stop), "create" '
                    '(run creates it), "wait" (a share mounted later: it is watched once it is there and '
                    'usable, and the log says what it waits for).')
    max_bytes: ByteSize = Field(
        default=ByteSize(20 << 20), gt=0,
        description="Larger files are never read: they get a file_too_large error record (as mqtt.max_payload).",
    )
    follow_symlinks: bool = Field(
        default=False,
        description="Take symbolic links to regular files (read through the link; links to devices, FIFOs or "
                    "sockets never). Off: links are ignored with a log line.",
    )
    alarm_image: bool = Field(
        default=False,
        description="When an answer raises an alarm, publish the frame (JPEG) retained on <base>/alarm_image/<rule> "
                    "for Home Assistant's MQTT image entity.")
    topics: tuple[str, ...] = Field(
        default=(), description="MQTT topics (wildcards allowed) whose images this rule answers."
    )
    crop: tuple[int, int, int, int] | None = Field(
        default=None, description="[x, y, width, height] of the region of the upright image to look at."
    )
    max_pixels: int | None = Field(
        default=None, ge=3136, le=16_777_216,
        description="Pixels the image is resized to at most before encoding (default: the model's max_pixels).",
    )
    pages: Literal["all", "first"] | tuple[Annotated[int, Field(ge=1, le=100_000)], ...] = Field(
        default="all",
        description='Documents (PDF, multi-page TIFF): the pages answered, "all", "first" or a list of page '
                    'numbers (1 is the first page). Each page is answered on its own; the record has one entry '
                    'per page under "pages".')
    max_pages: int = Field(
        default=50, ge=1, le=1000,
        description="A document with more pages to answer than this gets a too_many_pages error record instead.")
    questions: tuple[Question, ...] = Field(
        alias="question", min_length=1, description="The questions, as [[rule.question]] tables."
    )

    @model_validator(mode="after")
    def _check(self) -> Rule:
        ids = [q.id for q in self.questions]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate question ids: {', '.join(dupes)}")
        for topic in self.topics:
            problem = topic_filter_problem(topic)
            if problem:
                raise ValueError(f"topic {topic!r}: {problem}")
        if isinstance(self.pages, tuple):
            if not self.pages or len(set(self.pages)) != len(self.pages):
                raise ValueError("pages is a list of distinct page numbers (1 is the first page)")
            if len(self.pages) > self.max_pages:
                raise ValueError(f"pages lists {len(self.pages)} pages; max_pages is {self.max_pages}")
        if self.crop is not None and (self.crop[2] <= 0 or self.crop[3] <= 0 or min(self.crop[:2]) < 0):
            raise ValueError("crop is [x, y, width, height] with x, y >= 0 and a positive width and height")
        return self


class RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    rules: tuple[Rule, ...] = Field(alias="rule", default=(), description="The rules, as [[rule]] tables.")

    @model_validator(mode="after")
    def _unique(self) -> RulesFile:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate rule names: {', '.join(dupes)}")
        return self

    def get(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        known = ", ".join(r.name for r in self.rules) or "none"
        raise ConfigError(f"no rule named {name!r} (rules: {known})")


def load_rules(path: Path) -> RulesFile:
    """Read and validate a rules file; ``ConfigError`` lists every problem with its key path."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the rules file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    problems = _read_schema_files(path, raw)
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        return RulesFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(format_validation_error(path, exc, raw, RulesFile, text))) from None


def _read_schema_files(path: Path, raw: dict[str, Any]) -> list[str]:
    """Put each ``schema_file``'s schema into its question (as ``schema``), the file named relative to the rules
    file; one line per file that cannot be read."""
    problems = []
    rules = raw.get("rule")
    for rule in rules if isinstance(rules, list) else []:
        questions = rule.get("question") if isinstance(rule, dict) else None
        for question in questions if isinstance(questions, list) else []:
            if not isinstance(question, dict) or not isinstance(question.get("schema_file"), str):
                continue
            where = f'{path}: rule "{rule.get("name", "?")}", question "{question.get("id", "?")}"'
            if "schema" in question:
                problems.append(f"{where}: give schema or schema_file, not both")
                continue
            file = (path.parent / question["schema_file"]).resolve()
            question["schema_file"] = str(file)
            try:
                question["schema"] = json.loads(file.read_text(encoding="utf-8"))
            except OSError as exc:
                problems.append(f"{where}: cannot read schema_file {file}: {exc.strerror or exc}")
            except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
                problems.append(f"{where}: schema_file {file} is not JSON edgevl reads: {exc}")
    return problems


def load_daemon_rules(path: Path) -> RulesFile:
    """The rules file as the daemon needs it: valid, with at least one rule."""
    rules = load_rules(path)
    if not rules.rules:
        raise ConfigError(f"{path}: no [[rule]] defined")
    return rules
