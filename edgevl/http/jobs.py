"""Jobs from HTTP: a person is waiting, so they go to the model before the spool's, and are not spooled.

A request thread puts its job here and waits on the job's future; the daemon's
loop takes jobs out when the worker is free and sets their result.  The queue
is bounded: a request that finds it full is answered 429 at once instead of
waiting behind other people.  Recent records of every source are kept for
``GET /v1/results``.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from edgevl.records import Job, Record, new_job_id
from edgevl.rules import Rule


@dataclass
class HttpJob:
    job: Job
    data: bytes
    rule: Rule
    key: str = field(default_factory=lambda: "http-" + new_job_id())
    future: Future[Record] = field(default_factory=Future)


class QueueFull(Exception):
    pass


class HttpQueue:
    def __init__(self, max_waiting: int, wake: threading.Event) -> None:
        self.max_waiting = max_waiting
        self.wake = wake
        self._lock = threading.Lock()
        self._waiting: deque[HttpJob] = deque()
        self.open = True

    def put(self, job: HttpJob) -> None:
        with self._lock:
            if not self.open:
                raise QueueFull("edgevl is stopping")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for the model")
            self._waiting.append(job)
        self.wake.set()

    def take(self) -> HttpJob | None:
        with self._lock:
            while self._waiting:
                job = self._waiting.popleft()
                if job.future.set_running_or_notify_cancel():  # False: its request gave up waiting
                    return job
            return None

    def withdraw(self, job: HttpJob) -> bool:
        """Take back a job that has not started (its request timed out); False if it already runs."""
        return job.future.cancel()

    def close(self) -> list[HttpJob]:
        """No more jobs; the waiting ones are returned to be answered with an error."""
        with self._lock:
            self.open = False
            waiting, self._waiting = list(self._waiting), deque()
        return [j for j in waiting if j.future.set_running_or_notify_cancel()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)


class RecentRecords:
    def __init__(self, keep: int) -> None:
        self._lock = threading.Lock()
        self._records: deque[Record] = deque(maxlen=keep)

    def add(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)

    def find(self, job_id: str) -> Record | None:
        """The newest record of ``job_id`` among those kept."""
        with self._lock:
            return next((r for r in reversed(self._records) if r.get("job_id") == job_id), None)

    def latest(self, rule: str | None = None, limit: int = 20) -> list[Record]:
        """Newest first."""
        with self._lock:
            records = list(self._records)
        out = [r for r in reversed(records) if rule is None or r.get("rule") == rule]
        return out[:limit]
