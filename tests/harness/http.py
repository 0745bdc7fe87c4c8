"""The real HTTP application in process, with a thread standing in for an idle model worker."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import falcon.testing

from edgevl.config import HttpSettings
from edgevl.http.api import Backend, make_app
from edgevl.http.jobs import HttpJob, HttpQueue, RecentRecords
from edgevl.http.metrics import Metrics
from edgevl.rules import Rule

HOST = "127.0.0.1:8080"
IDLE_WORKER = {"pid": 1, "state": "ready", "restarts": 0, "rss": 1, "memory_limit": 2, "up_since": 0.0,
               "job": None, "job_seconds": 0.0, "standby": None}


def _answer_each_with_one(job: HttpJob) -> dict[str, Any]:
    return {q.id: {"value": 1} for q in job.rule.questions}


@contextlib.contextmanager
def in_process_api(settings: HttpSettings, rules: tuple[Rule, ...] = (), recent: RecentRecords | None = None,
                   image_roots: Callable[[], list[Path]] = list,
                   answers: Callable[[HttpJob], dict[str, Any]] = _answer_each_with_one,
                   ) -> Iterator[falcon.testing.TestClient]:
    """A test client of ``make_app``; queued jobs are answered at once with ``answers(job)``."""
    wake, stop = threading.Event(), threading.Event()
    queue = HttpQueue(4, wake)

    def answer() -> None:
        while not stop.is_set():
            wake.wait(0.05)
            wake.clear()
            while (job := queue.take()) is not None:
                job.future.set_result(job.job.result({"width": 1}, {"id": "m", "precision": "float32"},
                                                     answers(job), {}))

    backend = Backend("dev", lambda: rules, queue, recent or RecentRecords(10), lambda: (True, {}), lambda: {},
                      Metrics("m", "float32", lambda: IDLE_WORKER, lambda: 0), 200_704, image_roots)
    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield falcon.testing.TestClient(make_app(backend, settings, None), headers={"Host": HOST})
    finally:
        stop.set()
        thread.join(5)
