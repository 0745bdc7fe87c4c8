"""One input through decode (or a document's rendering), crop and the engine to its record: the path every
input uses."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from edgevl.documents import PageSelection, is_document, open_document, select_pages
from edgevl.engine.engine import Answered, Engine, Frame
from edgevl.errors import EdgevlError
from edgevl.images import DecodedImage, crop_image, decode_image
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
    pages_together: int = 1  # a document's pages answered together (the stream mode)

    @classmethod
    def of(cls, rule: Rule, max_pixels: int | None = None, pages_together: int = 1) -> Asked:
        """What ``rule`` asks; ``max_pixels`` overrides the rule's (edgevl ask --max-pixels)."""
        return cls(rule.questions, rule.crop, max_pixels or rule.max_pixels, rule.pages, rule.max_pages,
                   max(1, pages_together))


def answer_inputs(engine: Engine, inputs: Sequence[tuple[Job, bytes, Asked]]) -> list[Record]:
    """Each input's record, in order: the images answered together in one stream (each exactly as alone), each
    document alone after them.  An image that cannot be decoded or encoded costs only itself."""
    records: list[Record | None] = [None] * len(inputs)
    model = ModelInfo(id=engine.lm.model_id, precision=engine.lm.precision)
    frames: list[tuple[int, DecodedImage, float, Frame]] = []
    for index, (job, data, asked) in enumerate(inputs):
        if is_document(data):
            continue
        started = time.perf_counter()
        taken = _picture(job, model, data, asked.crop)
        if isinstance(taken, dict):
            records[index] = taken
            continue
        decoded, picture = taken
        frames.append((index, decoded, (time.perf_counter() - started) * 1000,
                       Frame(picture, asked.questions, asked.max_pixels)))
    results = engine.answer_frames([frame for *_, frame in frames]) if frames else []
    for (index, decoded, decode_ms, _), result in zip(frames, results, strict=True):
        records[index] = _image_record(inputs[index][0], model, decoded, decode_ms, result)
    for index, (job, data, asked) in enumerate(inputs):
        if records[index] is None:
            records[index] = answer_document(engine, job, data, asked)
    return [r for r in records if r is not None]


def run_image(engine: Engine, job: Job, data: bytes, questions: Sequence[Question],
              crop: tuple[int, int, int, int] | None = None,
              max_pixels: int | None = None) -> tuple[Record, Answered | None]:
    """An image's record, and the engine's full output behind it (None when the image failed)."""
    model = ModelInfo(id=engine.lm.model_id, precision=engine.lm.precision)
    started = time.perf_counter()
    taken = _picture(job, model, data, crop)
    if isinstance(taken, dict):
        return taken, None
    decoded, picture = taken
    decode_ms = (time.perf_counter() - started) * 1000
    result = engine.answer_frames([Frame(picture, questions, max_pixels)])[0]
    return _image_record(job, model, decoded, decode_ms, result), None if isinstance(result, EdgevlError) else result


def _picture(job: Job, model: ModelInfo, data: bytes,
             crop: tuple[int, int, int, int] | None) -> tuple[DecodedImage, Image.Image] | Record:
    """The decoded image and the picture its rule looks at, or the job's error record."""
    image_meta: ImageInfo | None = None
    try:
        decoded = decode_image(data)
        image_meta = decoded.meta()
        return decoded, crop_image(decoded.image, crop)
    except EdgevlError as exc:
        log.warning("job %s failed: %s (%s)", job.job_id, exc.message, exc.code)
        return job.error(exc.code, exc.message, image_meta, model)


def _image_record(job: Job, model: ModelInfo, decoded: DecodedImage, decode_ms: float,
                  result: Answered | EdgevlError) -> Record:
    if isinstance(result, EdgevlError):
        log.warning("job %s failed: %s (%s)", job.job_id, result.message, result.code)
        return job.error(result.code, result.message, decoded.meta(), model)
    timings = {
        "decode": decode_ms,
        "encode": result.encode_ms,
        "answer": result.answer_ms,
        "total": decode_ms + result.encode_ms + result.answer_ms,
    }
    return job.result(decoded.meta(), model, result.answers, timings)


def answer_document(engine: Engine, job: Job, data: bytes, asked: Asked) -> Record:
    """A document's one record: every selected page rendered and answered, ``asked.pages_together`` pages at a
    time in one stream (each page exactly as alone), each page's answers (or its error) under ``pages``.  A
    page that fails costs that page; a document none of whose pages could be answered is an error record."""
    model = ModelInfo(id=engine.lm.model_id, precision=engine.lm.precision)
    started = time.perf_counter()
    timings = {"decode": 0.0, "encode": 0.0, "answer": 0.0}
    results: dict[int, PageResult] = {}
    meta: ImageInfo = {"sha256": hashlib.sha256(data).hexdigest(), "width": 0, "height": 0, "format": "PDF"}
    try:
        with open_document(data) as document:
            meta["format"] = document.format
            numbers = select_pages(asked.pages, document.page_count, asked.max_pages)
            for start in range(0, len(numbers), asked.pages_together):
                rendering = time.perf_counter()
                pictures: list[tuple[int, Image.Image]] = []
                for number in numbers[start: start + asked.pages_together]:
                    try:
                        picture = document.render(number, asked.max_pixels or engine.max_pixels)
                        if document.format == "TIFF":  # a crop is in pixels, which a PDF page has none of
                            picture = crop_image(picture, asked.crop)
                    except EdgevlError as exc:
                        results[number] = _page_error(job, number, exc)
                        continue
                    pictures.append((number, picture))
                answering = time.perf_counter()
                timings["decode"] += (answering - rendering) * 1000
                answered = _answer_pages(engine, [picture for _, picture in pictures], asked)
                timings["answer"] += (time.perf_counter() - answering) * 1000
                for (number, picture), result in zip(pictures, answered, strict=True):
                    if isinstance(result, EdgevlError):
                        results[number] = _page_error(job, number, result)
                        continue
                    timings["encode"] += result.encode_ms
                    timings["answer"] -= result.encode_ms  # the pass's time beyond encoding the pages
                    if not meta["width"]:  # the first answered page's
                        meta["width"], meta["height"] = picture.width, picture.height
                    results[number] = {"page": number, "image": {"width": picture.width, "height": picture.height},
                                       "answers": result.answers}
            page_count = document.page_count
            pages = [results[number] for number in numbers]
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


def _answer_pages(engine: Engine, pictures: list[Image.Image], asked: Asked) -> list[Answered | EdgevlError]:
    """The pages answered together; should that fail as a whole (memory), each alone, so that whatever made it
    fail costs only the page that brought it."""
    frames = [Frame(picture, asked.questions, asked.max_pixels) for picture in pictures]
    if len(frames) > 1:
        try:
            return engine.answer_frames(frames)
        except Exception:  # MemoryError included: alone, each needs less
            log.exception("%d pages answered together failed; answering each alone", len(frames))
    return [result for frame in frames for result in engine.answer_frames([frame])]


def _page_error(job: Job, number: int, exc: EdgevlError) -> PageResult:
    log.warning("job %s page %d failed: %s (%s)", job.job_id, number, exc.message, exc.code)
    return {"page": number, "error": ErrorInfo(code=exc.code, message=exc.message)}
