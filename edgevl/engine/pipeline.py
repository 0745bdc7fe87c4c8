"""One image through decode, crop and the engine to its record: the path every input uses."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from edgevl.engine.engine import Answered, Engine
from edgevl.errors import EdgevlError
from edgevl.images import crop_image, decode_image
from edgevl.questions import Question
from edgevl.records import ImageInfo, Job, ModelInfo, Record

log = logging.getLogger(__name__)


def answer_image(engine: Engine, job: Job, data: bytes, questions: Sequence[Question],
                 crop: tuple[int, int, int, int] | None = None, max_pixels: int | None = None) -> Record:
    """Return the job's ``edgevl.result/2`` record, or its ``edgevl.error/1`` record when the image fails."""
    return run_image(engine, job, data, questions, crop, max_pixels)[0]


def run_image(engine: Engine, job: Job, data: bytes, questions: Sequence[Question],
              crop: tuple[int, int, int, int] | None = None,
              max_pixels: int | None = None) -> tuple[Record, Answered | None]:
    """The record, and the engine's full output behind it (None when the image failed)."""
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
