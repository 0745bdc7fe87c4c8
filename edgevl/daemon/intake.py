"""Waiting inputs made into work for the model worker: spooled jobs that are due, then files taken from the
watched folders, gathered into one batch of up to ``max_frames`` jobs (the stream mode).

Every step with one input runs while that input is noted in hand (see ``edgevl.spool.hand``), and ends it
with work for the worker or a record, whatever goes wrong.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edgevl.config import Config
from edgevl.daemon.delivery import Delivery
from edgevl.errors import InputError
from edgevl.folders.watcher import FolderWatcher
from edgevl.fsutil import read_regular
from edgevl.names import display
from edgevl.records import new_job_id, now_rfc3339
from edgevl.rules import Rule
from edgevl.spool.claim import claim
from edgevl.spool.hand import Hand
from edgevl.spool.job import SpoolJob
from edgevl.spool.store import Spool
from edgevl.worker.footprint import frames_of
from edgevl.worker.protocol import Work

log = logging.getLogger(__name__)


class Intake:
    def __init__(self, config: Config, spool: Spool, hand: Hand, watcher: FolderWatcher, delivery: Delivery,
                 rule: Callable[[str], Rule | None]) -> None:
        self.config = config
        self.spool = spool
        self.hand = hand
        self.watcher = watcher
        self.delivery = delivery
        self.rule = rule

    def batch(self, most: int) -> list[Work] | None:
        """Up to ``most`` frames' worth of jobs for the worker to answer together; None when nothing waited.

        A job the worker already died on goes alone: a poison input then costs the jobs that came with it one try,
        never two.  The worker's memory was fitted to ``most`` frames at the model's ``max_pixels``: a job whose
        rule encodes larger pictures counts as as many frames as its pixels hold (its cache grows with them), so
        a burst of large pictures never outgrows the cap the frames were fitted to; the first job always goes.
        An empty list: what waited was finished at once (a record it already had, or an error)."""
        works: list[Work] = []
        used = 0
        handled = False
        for job in self._waiting():
            handled = True
            alone = bool(job.worker_failures())
            size = self.frames_of(self.rule(job.rule))
            if works and (alone or used + size > most):
                continue  # its turn comes next (alone, or first of its batch)
            work = self.work(job)
            if work is None:
                continue
            works.append(work)
            used += size
            if used >= most or alone:
                break
        return works if handled else None

    def frames_of(self, rule: Rule | None) -> int:
        """How many frames at the model's ``max_pixels`` a picture of ``rule`` weighs in a batch."""
        return frames_of(rule.max_pixels if rule is not None else None, self.config.model.max_pixels)

    def _waiting(self) -> Iterator[SpoolJob]:
        """Spooled jobs first (retries and those a restart left), oldest first; then new files, taken as asked."""
        now = time.monotonic()
        for job in self.spool.pending(self.config.device_id):
            if self.delivery.due(job.key, now):
                yield job
        for path, rule_name in self.watcher.ready():
            self.watcher.forget(path)
            rule = self.rule(rule_name)
            if rule is None:
                continue
            claimed = self.claim(path, rule)
            if claimed is not None:
                yield claimed

    def claim(self, path: Path, rule: Rule) -> SpoolJob | None:
        """The file taken into the spool as a job; None when it was passed over or stays in its folder."""
        shown = display(str(path))[0]
        extra = {"EDGEVL_IMAGE": shown, "EDGEVL_RULE": rule.name}
        args = (path, rule.name, now_rfc3339(), int(rule.max_bytes), rule.follow_symlinks, self.config.device_id)
        job_id = new_job_id()
        # In hand by its path until it is taken, and by its job from then on (a copy across
        # filesystems, its recovery after a crash): each stage counts the same input's deaths.
        with self.hand.holding(f"file:{path}"), self.hand.holding(f"job:{job_id}"):
            try:
                claimed = claim(self.spool, *args, job_id=job_id)
                if claimed is not None:
                    log.info("took %s as job %s", shown, claimed.job_id, extra={**extra, "EDGEVL_JOB": claimed.job_id})
                return claimed
            except InputError as exc:
                self.watcher.pass_over(path, exc.message)
            except OSError as exc:
                log.error("cannot take %s into the spool: %s; it stays in its folder", shown, exc.strerror or exc,
                          extra=extra)
            except Exception as exc:
                log.exception("taking %s failed; it is taken as it is, with an error record", shown, extra=extra)
                try:
                    return claim(self.spool, *args, quarantine=(
                        "internal_error", f"edgevl could not take this file: {type(exc).__name__}: {exc}"))
                except Exception:
                    log.exception("cannot take %s even as it is; it is passed over", shown, extra=extra)
                    self.watcher.pass_over(path, "edgevl cannot take it (see the error above)")
        return None

    def work(self, job: SpoolJob) -> Work | None:
        """The spooled job as work for the worker, or None when it was delivered at once: it already had its
        record (answered before a crash or a failed delivery, or refused when taken), or it failed here."""
        with self.hand.holding(f"job:{job.key}"):
            if job.record() is not None:
                self.delivery.deliver(job.key, None)
                return None
            spooled = job.job(self.config.device_id)
            rule = self.rule(job.rule)
            if rule is None:
                self.delivery.deliver(job.key, spooled.error(
                    "rule_missing", f"rule {job.rule!r} is no longer in the rules file"))
                return None
            try:
                work = Work(job.key, spooled, read_regular(job.image, int(rule.max_bytes)), rule)
                pickle.dumps(work, protocol=pickle.HIGHEST_PROTOCOL)  # what cannot travel fails here, alone
                return work
            except InputError as exc:
                self.delivery.deliver(job.key, spooled.error(exc.code, exc.message))
            except OSError as exc:
                self.delivery.deliver(job.key, spooled.error(
                    "file_unreadable", f"cannot read the spooled image: {exc.strerror or exc}"))
            except Exception as exc:
                log.exception("cannot hand job %s to the model worker", job.key, extra={"EDGEVL_JOB": job.job_id})
                self.delivery.deliver(job.key, spooled.error(
                    "internal_error", f"edgevl could not run this job: {type(exc).__name__}: {exc}"))
        return None
