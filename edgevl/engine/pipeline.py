"""One input through decode (or a document's rendering), crop and the engine to its record: the path every
input uses."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from edgevl.documents import PageSelection, is_document, open_document, select_pages
from edgevl.engine.engine import Answered, Engine
from edgevl.errors import EdgevlError
from edgevl.images import crop_image, decode_image
from edgevl.questions import Question
from edgevl.records import ErrorInfo, ImageInfo, Job, ModelInfo, PageResult, Record
from edgevl.rules import Rule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asked:
    """What a rule asks of one input: its questions and how the picture is taken from the input."""

    questions: Sequence[Question]
    crop: tuple[int, int, int, int] | None = None
    max_pixels: int | None = None
    pages: PageSelection = "all"
    max_pages: int = 50

    @classmethod
    def of(cls, rule: Rule, max_pixels: int | None = None) -> Asked:
        """What ``rule`` asks; ``max_pixels`` overrides the rule's (edgevl ask --max-pixels)."""
        return cls(rule.questions, rule.crop, max_pixels or rule.max_pixels, rule.pages, rule.max_pages)


def answer_input(engine: Engine, job: Job, data: bytes, asked: Asked) -> Record:
    """The job's ``edgevl.result/2`` record, or its ``edgevl.error/1`` record when the input fails."""
    if is_document(data):
        return answer_document(engine, job, data, asked)
    return run_image(engine, job, data, asked.questions, asked.crop, asked.max_pixels)[0]


def run_image(engine: Engine, job: Job, data: bytes, questions: Sequence[Question],
              crop: tuple[int, int, int, int] | None = None,
              max_pixels: int | None = None) -> tuple[Record, Answered | None]:
    """An image's record, and the engine's full output behind it (None when the image failed)."""
    model = ModelInfo(id=engine.lm.model_id, precision=engine.lm.precision)
    started = time.perf_counter()
    image_meta: ImageInfo | None = None
    try:
        decoded = decode_image(data)
        image_meta = decoded.meta()
        picture = crop_image(decoded.image, crop)
        decoded_at = time.perf_counter()
        answered = engine.answer(picture, questions, max_pixels)
    except EdgevlError as exc:
        log.warning("job %s failed: %s (%s)", job.job_id, exc.message, exc.code)
        return job.error(exc.code, exc.message, image_meta, model), None
    total = (time.perf_counter() - started) * 1000
    timings = {
        "decode": (decoded_at - started) * 1000,
        "encode": answered.encode_ms,
        "answer": answered.answer_ms,
        "total": total,
    }
    return job.result(decoded.meta(), model, answered.answers, timings), answered


def answer_document(engine: Engine, job: Job, data: bytes, asked: Asked) -> Record:
    """A document's one record: every selected page rendered and answered in turn, each page's answers (or its
    error) under ``pages``.  A page that fails costs that page; a document none of whose pages could be answered
    is an error record."""
    model = ModelInfo(id=engine.lm.model_id, precision=engine.lm.precision)
    started = time.perf_counter()
    timings = {"decode": 0.0, "encode": 0.0, "answer": 0.0}
    pages: list[PageResult] = []
    meta: ImageInfo = {"sha256": hashlib.sha256(data).hexdigest(), "width": 0, "height": 0, "format": "PDF"}
    try:
        with open_document(data) as document:
            meta["format"] = document.format
            numbers = select_pages(asked.pages, document.page_count, asked.max_pages)
            for number in numbers:
                page_started = time.perf_counter()
                try:
                    picture = document.render(number, asked.max_pixels or engine.max_pixels)
                    if document.format == "TIFF":  # a crop is in pixels, which a PDF page has none of
                        picture = crop_image(picture, asked.crop)
                    rendered = time.perf_counter()
                    answered = engine.answer(picture, asked.questions, asked.max_pixels)
                except EdgevlError as exc:
                    log.warning("job %s page %d failed: %s (%s)", job.job_id, number, exc.message, exc.code)
                    pages.append({"page": number, "error": ErrorInfo(code=exc.code, message=exc.message)})
                    continue
                timings["decode"] += (rendered - page_started) * 1000
                timings["encode"] += answered.encode_ms
                timings["answer"] += answered.answer_ms
                if not meta["width"]:
                    meta["width"], meta["height"] = picture.width, picture.height
                pages.append({"page": number, "image": {"width": picture.width, "height": picture.height},
                              "answers": answered.answers})
            page_count = document.page_count
    except EdgevlError as exc:
        log.warning("job %s failed: %s (%s)", job.job_id, exc.message, exc.code)
        return job.error(exc.code, exc.message, meta, model)
    answered_pages = [p for p in pages if "answers" in p]
    if not answered_pages:
        first = pages[0]["error"]
        return job.error(first["code"], f"no page could be answered; page {pages[0]['page']}: {first['message']}",
                         meta, model)
    timings["total"] = (time.perf_counter() - started) * 1000
    record = job.result(meta, model, {}, timings)
    record["document"] = {"format": meta["format"], "page_count": page_count, "pages": numbers}
    record["pages"] = pages
    return record
