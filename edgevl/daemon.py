"""``edgevl run``: watched folders → rules → result folders, under systemd.

Signal handlers only set flags and wake the loop; the loop does the work:
SIGHUP reloads the rules (validated first), the first SIGTERM stops taking
work and lets the current image finish within ``daemon.stop_timeout``, a second
SIGTERM stops at once. Whatever is unfinished stays in the spool for the next start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from edgevl import __version__
from edgevl.config import Config, check, load_daemon_rules
from edgevl.errors import ConfigError
from edgevl.notify import Notifier
from edgevl.records import now_rfc3339
from edgevl.rules import Rule, RulesFile
from edgevl.runner import ModelRunner, Work
from edgevl.spool import Spool, SpoolJob
from edgevl.watcher import FolderWatcher

log = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 2.0, 60.0


class Daemon:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config: Config
        self.rules: RulesFile
        self.config, self.rules = check(config_path)
        self.wake = threading.Event()
        self.stop_requests = 0
        self.reload_requested = False
        self.counts: Counter[str] = Counter()
        self.notifier = Notifier()
        # job id -> (monotonic time before which it is not retried, its current backoff)
        self.retry: dict[str, tuple[float, float]] = {}

    # signal handlers: flags only
    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requests += 1
        self.wake.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True
        self.wake.set()

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules.rules if r.name == name), None)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        config = self.config
        with contextlib.ExitStack() as stack:
            self.spool = Spool(config.spool_dir)
            log.info("edgevl %s starting: %d rules, model %s (%s), %d jobs in the spool", __version__,
                     len(self.rules.rules), config.model.id, config.model.precision, len(self.spool.pending()))
            self.runner = stack.enter_context(ModelRunner(config))
            self.watcher = stack.enter_context(FolderWatcher(
                self.rules.rules, config.folders.settle_ms, config.folders.poll_interval,
                config.folders.rescan_interval, self.wake))
            self.notifier.ready(self.status_text())
            log.info("ready: watching %d folders", sum(len(r.folders) for r in self.rules.rules))
            return self._loop()

    def _loop(self) -> int:
        config = self.config
        deadline: float | None = None
        next_status = 0.0
        while True:
            self.wake.clear()
            now = time.monotonic()
            if self.stop_requests >= 2:
                log.warning("second stop request: stopping now; the current job stays in the spool")
                self.notifier.stopping("stopping now")
                return 0
            if self.stop_requests and deadline is None:
                deadline = now + config.daemon.stop_timeout
                self.notifier.stopping(f"stopping: finishing {self.runner.current or 'nothing'}")
                log.info("stop requested: taking no more work, finishing the current image (at most %.0f s)",
                         config.daemon.stop_timeout)
            if self.reload_requested:
                self.reload_requested = False
                self._reload()

            finished = self.runner.poll()
            if finished is not None:
                self._deliver(*finished)
            if deadline is not None:
                if not self.runner.busy:
                    log.info("stopped cleanly")
                    return 0
                if now >= deadline:
                    log.warning("stop timeout: leaving %s in the spool", self.runner.current)
                    return 0
            else:
                self.watcher.tick()
                if not self.runner.busy:
                    self._start_next()

            if now >= next_status:
                self.notifier.status(self.status_text())
                next_status = now + config.daemon.status_interval
            self.notifier.watchdog(self.healthy())
            self.wake.wait(0.05 if self.runner.busy else min(0.5, max(0.02, self.watcher.next_settle_in())))
            if self.runner.busy:
                self.runner.wait(0.2)

    def healthy(self) -> bool:
        """The loop runs (we are here) and the model is idle or making progress."""
        return self.runner.seconds_since_progress() < self.stall_timeout()

    def stall_timeout(self) -> float:
        if self.config.model.stall_timeout:
            return self.config.model.stall_timeout
        # No forward pass takes anywhere near this long on the 2B model at the default image size;
        # larger images get proportionally longer.
        return 120.0 * max(1.0, self.config.model.max_pixels / 200_704)

    def status_text(self) -> str:
        current = self.runner.current
        queued = self.watcher.waiting() + self.spool.count()
        text = f"queued {queued}, done {self.counts['done']}, failed {self.counts['failed']}"
        if current:
            text += f", working on {current} for {time.monotonic() - self.runner.started_at:.0f} s"
        return text

    def _start_next(self) -> None:
        now = time.monotonic()
        for job in self.spool.pending():
            if self.retry.get(job.job_id, (0.0, 0.0))[0] > now:
                continue
            self._run(job)
            return
        for path, rule_name in self.watcher.ready():
            self.watcher.forget(path)
            try:
                claimed = self.spool.claim(path, rule_name, now_rfc3339())
            except OSError as exc:
                log.error("cannot take %s into the spool: %s; it stays in its folder", path, exc.strerror or exc,
                          extra={"EDGEVL_IMAGE": str(path), "EDGEVL_RULE": rule_name})
                continue
            if claimed is not None:
                log.info("took %s as job %s", path, claimed.job_id,
                         extra={"EDGEVL_JOB": claimed.job_id, "EDGEVL_RULE": rule_name, "EDGEVL_IMAGE": str(path)})
                self._run(claimed)
                return

    def _run(self, job: SpoolJob) -> None:
        if job.record() is not None:  # answered before a crash or a failed delivery
            self._deliver(job.job_id, None)
            return
        spooled = job.job(self.config.device_id)
        rule = self.rule(job.rule)
        if rule is None:
            missing = spooled.error("rule_missing", f"rule {job.rule!r} is no longer in the rules file")
            self._deliver(job.job_id, missing)
            return
        try:
            data = job.image.read_bytes()
        except OSError as exc:
            self._deliver(job.job_id, spooled.error("file_unreadable", f"cannot read the spooled image: {exc}"))
            return
        self.runner.submit(Work(job.job_id, spooled, data, rule))

    def _deliver(self, job_id: str, record: dict[str, Any] | None) -> None:
        """Save the job's record (None: it is already saved) and deliver it; retried later on I/O errors."""
        extra = {"EDGEVL_JOB": job_id}
        try:
            job = self.spool.load(job_id)
            extra.update(EDGEVL_RULE=job.rule, EDGEVL_IMAGE=str(job.meta["source"]["path"]))
            if record is None:
                record = job.record()
            else:
                job.save_record(record)
            folders = self.config.folders
            target = self.spool.finish(job, folders.results, folders.archive, folders.failed)
        except OSError as exc:
            delay = min(RETRY_MAX, self.retry.get(job_id, (0.0, RETRY_MIN / 2))[1] * 2)
            self.retry[job_id] = (time.monotonic() + delay, delay)
            log.error("cannot deliver job %s: %s (%s); it stays in the spool, retrying in %.0f s",
                      job_id, exc.strerror or exc, getattr(exc, "filename", "") or "", delay, extra=extra)
            return
        self.retry.pop(job_id, None)
        failed = record is not None and record["schema"] != "edgevl.result/1"
        self.counts["failed" if failed else "done"] += 1
        if failed and record is not None:
            log.warning("job %s failed: %s: %s → %s", job_id, record["error"]["code"], record["error"]["message"],
                        target, extra=extra)
        else:
            log.info("job %s answered → %s", job_id, target, extra=extra)

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            rules = load_daemon_rules(self.config.rules)
        except ConfigError as exc:
            log.error("reload refused, keeping the current rules:\n%s", exc.message)
            self.notifier.reloaded(self.status_text())
            return
        self.rules = rules
        self.watcher.set_rules(rules.rules)
        log.info("reloaded %d rules from %s", len(rules.rules), self.config.rules)
        self.notifier.reloaded(self.status_text())


def run(config_path: Path) -> int:
    daemon = Daemon(config_path)
    code = daemon.run()
    logging.shutdown()
    if daemon.stop_requests >= 2 or daemon.runner.busy:
        # The model thread may be inside a forward pass; do not wait for it.
        os._exit(code)
    return code
