"""The result and error records: the contract every output of edgevl uses.

One record per input, an image or a whole document: ``edgevl.result/2`` with its
answers (a document's page by page), or ``edgevl.error/1`` with the reason.
Records are plain JSON objects, typed here; ``is_error`` is the one test of
which kind a record is, and ``to_json`` the one serializer.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired, TypedDict

from typing_extensions import TypeIs

from edgevl.config import default_device_id

RESULT_SCHEMA: Literal["edgevl.result/2"] = "edgevl.result/2"
ERROR_SCHEMA: Literal["edgevl.error/1"] = "edgevl.error/1"

SourceKind = Literal["cli", "folder", "mqtt", "http", "spool"]


class Source(TypedDict, total=False):
    """Where an image came from."""

    kind: SourceKind
    path: str  # folder and cli: the path as text (undecodable bytes as \\xNN)
    path_base64: str  # folder: the path's bytes, when they are not UTF-8
    topic: str  # mqtt
    meta: dict[str, Any]  # mqtt: the sender's meta, as it sent it


class ImageInfo(TypedDict):
    sha256: str
    width: int
    height: int
    format: str


class ModelInfo(TypedDict):
    id: str
    precision: str


class ErrorInfo(TypedDict):
    code: str
    message: str


class Answer(TypedDict, total=False):
    """One question's answer; which keys are present depends on its type (see the README)."""

    type: str
    value: Any
    p_yes: float  # yes_no: P(yes), calibrated when the question is
    p_yes_raw: float  # yes_no, calibrated: the model's own P(yes)
    confidence: float  # the probability of the answer given
    confidence_raw: float  # choice, calibrated: the model's own probability of the option chosen
    alarm: bool
    probabilities: dict[str, float]
    text: str
    truncated: bool
    error: ErrorInfo
    question: str  # ad-hoc questions (edgevl ask -q, POST /v1/ask with questions): the text asked


class PageImage(TypedDict):
    width: int
    height: int


class PageResult(TypedDict, total=False):
    """One page of a document: its answers, or why it has none."""

    page: int  # 1-based, as printed on a page counter
    image: PageImage  # its pixels: a TIFF page's own, a PDF page's as rendered for the model
    answers: dict[str, Answer]
    error: ErrorInfo


class DocumentInfo(TypedDict):
    format: str  # "PDF" or "TIFF"
    page_count: int  # pages in the document
    pages: list[int]  # the pages the rule asked about, in order


class _Identity(TypedDict):
    """What every record says of its job, result or error."""

    job_id: str
    device_id: str
    rule: str
    source: Source
    received_at: str
    finished_at: str
    # Where the image is kept now (the archive or the failed folder), or None when it was deleted;
    # absent where edgevl never kept the image (HTTP, edgevl ask).
    image_file: NotRequired[str | None]


class ResultRecord(_Identity):
    schema: Literal["edgevl.result/2"]
    image: ImageInfo
    model: ModelInfo
    # An image's answers; {} for a document, whose answers are under ``pages``.
    answers: dict[str, Answer]
    timings_ms: dict[str, float]
    document: NotRequired[DocumentInfo]  # a PDF, or a TIFF of several pages
    pages: NotRequired[list[PageResult]]  # a document: one entry per page of document.pages, in that order


class ErrorRecord(_Identity):
    schema: Literal["edgevl.error/1"]
    image: NotRequired[ImageInfo]
    model: NotRequired[ModelInfo]
    error: ErrorInfo


Record = ResultRecord | ErrorRecord


def all_answers(record: ResultRecord) -> Iterator[tuple[int | None, str, Answer]]:
    """(page or None, question id, answer) of every answer in the record: an image's, or each page's."""
    for question, answer in record["answers"].items():
        yield None, question, answer
    for page in record.get("pages", []):
        for question, answer in page.get("answers", {}).items():
            yield page["page"], question, answer


def is_error(record: Record) -> TypeIs[ErrorRecord]:
    """Whether ``record`` is an error record: the one test every output uses."""
    return record["schema"] != RESULT_SCHEMA


def to_json(record: Record, indent: int | None = None) -> str:
    """The record as JSON text: indented for files, compact for messages."""
    separators = (",", ": ") if indent else (",", ":")
    return json.dumps(record, ensure_ascii=False, indent=indent, separators=separators)


def with_questions(record: Record, asked: dict[str, str]) -> Record:
    """The record with each answer's question text beside it: an ad-hoc question has no rule to look it up in."""
    if not is_error(record):
        for _, question, answer in all_answers(record):
            if question in asked:
                answer["question"] = asked[question]
    return record


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_job_id() -> str:
    """Unique across processes and appliances, and sortable by creation time (the spool's FIFO order)."""
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


@dataclass
class Job:
    """Identity of one image's job, shared by its result or error record."""

    rule: str
    source: Source
    device_id: str = field(default_factory=default_device_id)
    job_id: str = field(default_factory=new_job_id)
    received_at: str = field(default_factory=now_rfc3339)

    def result(self, image: ImageInfo, model: ModelInfo, answers: dict[str, Answer],
               timings_ms: dict[str, float]) -> ResultRecord:
        return {
            "schema": RESULT_SCHEMA, "job_id": self.job_id, "device_id": self.device_id, "rule": self.rule,
            "source": Source(**self.source), "received_at": self.received_at, "finished_at": now_rfc3339(),
            "image": image, "model": model, "answers": answers,
            "timings_ms": {k: round(v, 1) for k, v in timings_ms.items()},
        }

    def error(self, code: str, message: str, image: ImageInfo | None = None,
              model: ModelInfo | None = None) -> ErrorRecord:
        record: ErrorRecord = {
            "schema": ERROR_SCHEMA, "job_id": self.job_id, "device_id": self.device_id, "rule": self.rule,
            "source": Source(**self.source), "received_at": self.received_at, "finished_at": now_rfc3339(),
            "error": {"code": code, "message": message},
        }
        if image is not None:
            record["image"] = image
        if model is not None:
            record["model"] = model
        return record
