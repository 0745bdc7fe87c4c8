"""A finished job's record to its outputs: the result or failed folder, the archive, and MQTT.

Delivery happens on the daemon's loop. A storage problem (a full disk, a results
folder that cannot be written) leaves the job in the spool and is retried with
exponential backoff; anything else that goes wrong with one job sets that job
aside with an error record under a name made from its key, so that one input
can never stop the loop. A job's MQTT messages go to the outbox once, however
often its folder delivery is retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from edgevl.config import FolderSettings
from edgevl.records import Record, is_error
from edgevl.spool.hand import Hand
from edgevl.spool.job import SpoolJob
from edgevl.spool.store import Spool

log = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 2.0, 60.0


class Publisher(Protocol):
    def deliver(self, job: SpoolJob, record: Record, alarm_jpeg: bytes | None = None) -> None: ...


class Delivery:
    def __init__(self, spool: Spool, folders: FolderSettings, device_id: str, hand: Hand,
                 on_done: Callable[[Record], None]) -> None:
        self.spool = spool
        self.folders = folders
        self.device_id = device_id
        self.hand = hand
        self.on_done = on_done
        self.publisher: Publisher | None = None
        # job key -> (monotonic time before which it is not retried, its current backoff)
        self._retry: dict[str, tuple[float, float]] = {}

    def due(self, key: str, now: float) -> bool:
        return self._retry.get(key, (0.0, 0.0))[0] <= now

    def deliver(self, key: str, record: Record | None, alarm_jpeg: bytes | None = None) -> None:
        """Save the job's record (None: it is already saved) and its alarm frame, and deliver them."""
        with self.hand.holding(f"job:{key}"):
            try:
                self._deliver(key, record, alarm_jpeg=alarm_jpeg)
            except OSError as exc:
                self._later(key, exc)
            except Exception as exc:
                log.exception("job %s cannot be delivered; it is set aside with an error record", key,
                              extra={"EDGEVL_JOB": key})
                try:
                    self.spool.quarantine(key, self.device_id, "internal_error",
                                          f"edgevl could not deliver this job: {type(exc).__name__}: {exc}")
                    self._deliver(key, None, set_aside=True)
                except OSError as again:
                    self._later(key, again)

    def _later(self, key: str, exc: OSError) -> None:
        delay = min(RETRY_MAX, self._retry.get(key, (0.0, RETRY_MIN / 2))[1] * 2)
        self._retry[key] = (time.monotonic() + delay, delay)
        log.error("cannot deliver job %s: %s (%s); it stays in the spool, retrying in %.0f s",
                  key, exc.strerror or exc, getattr(exc, "filename", "") or "", delay, extra={"EDGEVL_JOB": key})

    def _deliver(self, key: str, record: Record | None, set_aside: bool = False,
                 alarm_jpeg: bytes | None = None) -> None:
        job = self.spool.load(key)
        source = job.meta["source"]
        extra = {"EDGEVL_JOB": job.job_id, "EDGEVL_RULE": job.rule,
                 "EDGEVL_IMAGE": str(source.get("path") or source.get("topic"))}
        if record is None:
            record = job.record()
            if record is None:
                raise RuntimeError("the job has no record to deliver")
        else:
            if alarm_jpeg is not None:
                job.save_alarm_image(alarm_jpeg)  # before the record: a saved record means all is saved
            job.save_record(record)
        record = job.complete(record).copy()
        # Decided (and kept) before anything is published, so that every output names the same file.
        record["image_file"] = self.spool.place_image(job, is_error(record), self.folders.archive,
                                                      self.folders.failed)
        if self.publisher is not None and not job.published:
            try:
                self.publisher.deliver(job, record, job.alarm_image())
            except OSError:
                raise  # a full disk: retried like the rest of the delivery
            except Exception:
                if not set_aside:
                    raise
                # Publishing may be what broke: the error record still goes to failed/.
                log.exception("job %s: its error record is not published", key, extra=extra)
            else:
                job.mark_published()
        target = self.spool.finish(job, self.folders.results, self.folders.archive, self.folders.failed)
        self._retry.pop(key, None)
        self.on_done(record)
        if is_error(record):
            log.warning("job %s failed: %s: %s → %s", job.job_id, record["error"]["code"], record["error"]["message"],
                        target, extra=extra)
        else:
            log.info("job %s answered → %s", job.job_id, target, extra=extra)
