"""``edgevl run``: watched folders → rules → result folders, under systemd.

Signal handlers only set flags and wake the loop; the loop does the work:
SIGHUP reloads the rules (validated first), the first SIGTERM stops taking
work and lets the current image finish within ``daemon.stop_timeout``, a second
SIGTERM stops at once. Whatever is unfinished stays in the spool for the next start.

The model runs in a worker process (see ``supervisor``); the daemon keeps the
inputs, the spool and the outputs, and never loads torch itself.
"""

from __future__ import annotations

import contextlib
import logging
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
from edgevl.http_api import Backend, make_app
from edgevl.http_jobs import HttpJob, HttpQueue, RecentRecords
from edgevl.http_server import HttpServer
from edgevl.memcap import format_bytes
from edgevl.metrics import Metrics
from edgevl.mqtt_service import MqttService
from edgevl.notify import Notifier
from edgevl.records import RESULT_SCHEMA, now_rfc3339
from edgevl.rules import Rule, RulesFile
from edgevl.spool import Spool, SpoolJob
from edgevl.supervisor import Finished, Lost, WorkerSupervisor
from edgevl.watcher import FolderWatcher

log = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 2.0, 60.0
# A job present at this many worker deaths is failed: a poison image is tried twice, never forever.
WORKER_ATTEMPTS = 2
EXIT_WORKER_GAVE_UP = 3

_LOST_MESSAGES = {
    "memory_limit": "the model worker went over model.memory_limit on this image",
    "worker_crashed": "the model worker crashed on this image",
    "worker_stalled": "the model worker made no progress on this image",
}


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
        self.mqtt: MqttService | None = None
        self.http_queue = HttpQueue(self.config.http.max_waiting, self.wake)
        self.http_running: dict[str, HttpJob] = {}
        self.recent = RecentRecords(self.config.http.recent_results)
        self.stopping = False

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
            self.supervisor = stack.enter_context(WorkerSupervisor(config, self.wake))
            self.metrics = Metrics(config.model.id, config.model.precision, self.supervisor.health,
                                   lambda: self._counts()["queued"])
            if config.http.listen:
                # Up while the model loads: /healthz says so, and requests wait for it.
                backend = Backend(config.device_id, lambda: self.rules.rules, self.http_queue, self.recent,
                                  self._health, self._status, self.metrics)
                stack.enter_context(HttpServer(make_app(backend, config.http, config.http.token()), config.http))
                # Runs before the server stops: the requests still waiting get their answer.
                stack.callback(self._close_http)
            self.notifier.status("loading the model")
            if not self.supervisor.wait_ready(lambda: self.stop_requests > 0):
                log.info("stop requested while loading the model")
                return 0
            self.watcher = stack.enter_context(FolderWatcher(
                self.rules.rules, config.folders.settle_ms, config.folders.poll_interval,
                config.folders.rescan_interval, self.wake))
            if config.mqtt.enabled:
                self.mqtt = stack.enter_context(MqttService(config, self.rules.rules, self.spool, self.wake,
                                                            self._status_fields))
            elif any(r.topics for r in self.rules.rules):
                log.warning("rules name MQTT topics but [mqtt] host is empty: those topics are not read")
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
                self.notifier.stopping(f"stopping: finishing {self.supervisor.current or 'nothing'}")
                self.stopping = True
                if self.mqtt is not None:
                    self.mqtt.stopping()
                for job in self.http_queue.close():
                    job.future.set_result(job.job.error("stopping", "edgevl is stopping"))
                log.info("stop requested: taking no more work, finishing the current image (at most %.0f s)",
                         config.daemon.stop_timeout)
            if self.reload_requested:
                self.reload_requested = False
                self._reload()

            for event in self.supervisor.poll(now):
                if event.key is not None and event.key in self.http_running:
                    self._finish_http(event)
                elif isinstance(event, Finished):
                    self._deliver(event.key, event.record)
                elif isinstance(event, Lost) and event.key is not None:
                    self._lost(event)
            if self.supervisor.gave_up:
                log.error("%s: exiting so that the service manager can restart edgevl", self.supervisor.gave_up)
                self.notifier.stopping(f"failed: {self.supervisor.gave_up}")
                return EXIT_WORKER_GAVE_UP
            if deadline is not None:
                if not self.supervisor.busy:
                    log.info("stopped cleanly")
                    return 0
                if now >= deadline:
                    log.warning("stop timeout: leaving %s in the spool", self.supervisor.current)
                    return 0
            else:
                self.watcher.tick()
                if self.supervisor.ready:
                    self._start_next()

            if self.mqtt is not None:
                for record in self.mqtt.tick(now):
                    self._record_done(record)
            if now >= next_status:
                self.notifier.status(self.status_text())
                next_status = now + config.daemon.status_interval
            # Fed while the loop runs and the worker is idle, loading in time or making
            # progress; a stuck worker stops the pings until it has been replaced.
            self.notifier.watchdog(self.supervisor.healthy(now))
            busy = self.supervisor.busy or not self.supervisor.ready
            self.wake.wait(0.5 if busy else min(0.5, max(0.02, self.watcher.next_settle_in())))

    def _counts(self) -> dict[str, int]:
        queued = self.watcher.waiting() + self.spool.count() if hasattr(self, "watcher") else self.spool.count()
        queued += len(self.http_queue)
        return {"queued": queued, "done": self.counts["done"], "failed": self.counts["failed"]}

    def _status_fields(self) -> dict[str, Any]:
        """The counters and the worker's health, for the retained MQTT status."""
        h = self.supervisor.health()
        worker = {"state": h["state"], "restarts": h["restarts"], "rss": h["rss"], "memory_limit": h["memory_limit"]}
        return {**self._counts(), "worker": worker}

    def _health(self) -> tuple[bool, dict[str, Any]]:
        """For /healthz: the worker is up and the inputs are read."""
        worker = self.supervisor.health()["state"]
        watcher = getattr(self, "watcher", None)
        inputs = "watching" if watcher is not None and watcher.alive else "starting" if watcher is None else "down"
        detail: dict[str, Any] = {"worker": worker, "inputs": inputs, "stopping": self.stopping}
        if self.mqtt is not None:
            detail["mqtt"] = "connected" if self.mqtt.link.connected else "disconnected"
        return worker in ("ready", "busy") and inputs == "watching" and not self.stopping, detail

    def _status(self) -> dict[str, Any]:
        h = self.supervisor.health()
        worker = {k: h[k] for k in ("pid", "state", "restarts", "rss", "memory_limit", "job", "job_seconds")}
        worker["up_seconds"] = round(time.time() - h["up_since"], 1)
        status: dict[str, Any] = {
            "device_id": self.config.device_id, "version": __version__, "state": "stopping" if self.stopping else
            "online", "model": {"id": self.config.model.id, "precision": self.config.model.precision},
            **self._counts(), "worker": worker,
        }
        if self.mqtt is not None:
            status["mqtt"] = {"connected": self.mqtt.link.connected, "outbox": len(self.mqtt.outbox)}
        return status

    def _finish_http(self, event: Finished | Lost) -> None:
        job = self.http_running.pop(event.key or "")
        if isinstance(event, Finished):
            record = event.record
        else:
            record = job.job.error(event.code, f"{_LOST_MESSAGES[event.code]}; {event.detail}")
        self._record_done(record)
        job.future.set_result(record)

    def _close_http(self) -> None:
        for job in [*self.http_queue.close(), *self.http_running.values()]:
            if not job.future.done():
                job.future.set_result(job.job.error("stopping", "edgevl stopped before answering"))
        self.http_running.clear()

    def _record_done(self, record: dict[str, Any]) -> bool:
        """Count a finished job of any source; True when its record is an error."""
        failed: bool = record["schema"] != RESULT_SCHEMA
        self.counts["failed" if failed else "done"] += 1
        self.recent.add(record)
        self.metrics.observe(record)
        return failed

    def status_text(self) -> str:
        counts = self._counts()
        text = f"queued {counts['queued']}, done {counts['done']}, failed {counts['failed']}"
        h = self.supervisor.health()
        text += (f"; worker {h['pid']} {h['state']}, up {time.time() - h['up_since']:.0f} s, "
                 f"restarts {h['restarts']}, RSS {format_bytes(h['rss'])} of {format_bytes(h['memory_limit'])}")
        if h["job"]:
            text += f", on {h['job']} for {h['job_seconds']:.0f} s"
        if self.mqtt is not None:
            text += f"; {self.mqtt.status_text()}"
        return text

    def _start_next(self) -> None:
        http = self.http_queue.take()
        if http is not None:  # a person is waiting: before the folders and MQTT
            self.http_running[http.key] = http
            self.supervisor.submit(http.key, http.job, http.data, http.rule)
            return
        now = time.monotonic()
        for job in self.spool.pending():
            if self.retry.get(job.key, (0.0, 0.0))[0] > now:
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
            self._deliver(job.key, None)
            return
        spooled = job.job(self.config.device_id)
        rule = self.rule(job.rule)
        if rule is None:
            missing = spooled.error("rule_missing", f"rule {job.rule!r} is no longer in the rules file")
            self._deliver(job.key, missing)
            return
        try:
            data = job.image.read_bytes()
        except OSError as exc:
            self._deliver(job.key, spooled.error("file_unreadable", f"cannot read the spooled image: {exc}"))
            return
        self.supervisor.submit(job.key, spooled, data, rule)

    def _lost(self, event: Lost) -> None:
        """The worker died on this job: retry it once, then fail it with the reason."""
        assert event.key is not None
        extra = {"EDGEVL_JOB": event.key}
        try:
            job = self.spool.load(event.key)
            failures = job.add_worker_failure(event.code)
        except OSError as exc:
            log.error("cannot record the worker's failure on job %s: %s", event.key, exc, extra=extra)
            return
        if len(failures) < WORKER_ATTEMPTS:
            log.warning("job %s will be tried once more (%s: %s)", event.key, event.code, event.detail, extra=extra)
            return
        message = f"{_LOST_MESSAGES[event.code]}, {len(failures)} times; last time {event.detail}"
        self._deliver(event.key, job.job(self.config.device_id).error(event.code, message))

    def _deliver(self, key: str, record: dict[str, Any] | None) -> None:
        """Save the job's record (None: it is already saved) and deliver it; retried later on I/O errors."""
        extra = {"EDGEVL_JOB": key}
        job_id = key
        try:
            job = self.spool.load(key)
            job_id = job.job_id
            source = job.meta["source"]
            extra.update(EDGEVL_JOB=job_id, EDGEVL_RULE=job.rule,
                         EDGEVL_IMAGE=str(source.get("path") or source.get("topic")))
            if record is None:
                record = job.record()
            else:
                job.save_record(record)
            if self.mqtt is not None and record is not None:
                self.mqtt.deliver(job, record)
            folders = self.config.folders
            target = self.spool.finish(job, folders.results, folders.archive, folders.failed)
        except OSError as exc:
            delay = min(RETRY_MAX, self.retry.get(key, (0.0, RETRY_MIN / 2))[1] * 2)
            self.retry[key] = (time.monotonic() + delay, delay)
            log.error("cannot deliver job %s: %s (%s); it stays in the spool, retrying in %.0f s",
                      job_id, exc.strerror or exc, getattr(exc, "filename", "") or "", delay, extra=extra)
            return
        self.retry.pop(key, None)
        assert record is not None
        if self._record_done(record):
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
        if self.mqtt is not None:
            self.mqtt.set_rules(rules.rules)
        log.info("reloaded %d rules from %s", len(rules.rules), self.config.rules)
        self.notifier.reloaded(self.status_text())


def run(config_path: Path) -> int:
    daemon = Daemon(config_path)
    code = daemon.run()
    logging.shutdown()
    return code
