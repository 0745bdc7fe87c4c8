"""The model runner: loads the engine once and answers one job at a time off the main loop."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from edgevl.config import Config
from edgevl.engine.engine import Engine
from edgevl.engine.loading import load_model
from edgevl.pipeline import answer_image
from edgevl.records import Job
from edgevl.rules import Rule

log = logging.getLogger(__name__)


@dataclass
class Work:
    key: str
    job: Job
    data: bytes
    rule: Rule


class ModelRunner:
    """One worker thread around the engine. The main loop submits and polls; it never blocks on the model."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine: Engine | None = None
        self._work: Work | None = None
        self._result: tuple[str, dict[str, Any]] | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.started_at = 0.0  # monotonic start of the current job
        # Test-only switch: while this file exists, a job is held before the
        # model runs (no progress), to test stops, stalls and the watchdog.
        self._hold = os.environ.get("EDGEVL_TEST_HOLD_FILE")

    def __enter__(self) -> ModelRunner:
        lm = load_model(self.config.model.id, self.config.model.precision, self.config.model.threads)
        self.engine = Engine(lm, max_batch=self.config.model.max_batch, max_pixels=self.config.model.max_pixels)
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._work is not None or self._result is not None

    @property
    def current(self) -> str | None:
        with self._cond:
            return self._work.key if self._work else None

    def seconds_since_progress(self) -> float:
        if self.engine is None or not self.busy:
            return 0.0
        return time.monotonic() - max(self.engine.last_progress, self.started_at)

    def submit(self, work: Work) -> None:
        with self._cond:
            if self._work is not None or self._result is not None:
                raise RuntimeError("the model is busy")
            self.started_at = time.monotonic()
            self._work = work
            self._cond.notify_all()

    def poll(self) -> tuple[str, dict[str, Any]] | None:
        with self._cond:
            result, self._result = self._result, None
            return result

    def wait(self, timeout: float) -> None:
        with self._cond:
            if self._result is None and self._work is not None:
                self._cond.wait(timeout)

    def _loop(self) -> None:
        assert self.engine is not None
        while True:
            with self._cond:
                while self._work is None and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                work = self._work
            assert work is not None
            while self._hold and os.path.exists(self._hold) and not self._closing:
                time.sleep(0.05)
            try:
                record = answer_image(self.engine, work.job, work.data, work.rule.questions, work.rule.crop,
                                      work.rule.max_pixels)
            except Exception as exc:  # a bug or resource failure must not kill the thread silently
                log.exception("job %s failed inside the engine", work.job.job_id,
                              extra={"EDGEVL_JOB": work.job.job_id, "EDGEVL_RULE": work.rule.name})
                record = work.job.error("engine_failed", f"{type(exc).__name__}: {exc}")
            with self._cond:
                self._work = None
                self._result = (work.key, record)
                self._cond.notify_all()
