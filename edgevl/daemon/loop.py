"""``edgevl run``: watched folders and MQTT → rules → the model worker → outputs, under systemd.

Signal handlers only set flags and wake the loop; the loop does the work:
SIGHUP reloads the rules (validated first), the first SIGTERM stops taking
work and lets the current images finish within ``daemon.stop_timeout``, a second
SIGTERM stops at once. Whatever is unfinished stays in the spool for the next start.

No single input may stop the loop: every step with one input runs while the
input is noted in hand (see ``edgevl.spool.hand``), and ends it with a record, whatever
goes wrong; an input that was in hand when the daemon died twice in a row is
quarantined at the next start, before anything else runs.

The model runs in a worker process (see ``edgevl.worker``); the daemon keeps the
inputs, the spool and the outputs, and never loads torch itself.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from edgevl import __version__
from edgevl.commands.check import check, check_rules
from edgevl.config import Config
from edgevl.daemon.delivery import Delivery
from edgevl.daemon.intake import Intake
from edgevl.daemon.notify import Notifier
from edgevl.daemon.quarantine import quarantine_poison
from edgevl.daemon.retention import Retention
from edgevl.daemon.status import Status
from edgevl.errors import ConfigError
from edgevl.folders.layout import create_folders
from edgevl.folders.watcher import FolderWatcher
from edgevl.http.api import ADHOC_RULE, Backend, make_app
from edgevl.http.jobs import HttpJob, HttpQueue, RecentRecords
from edgevl.http.metrics import Metrics
from edgevl.http.server import HttpServer
from edgevl.logsetup import set_level
from edgevl.mqtt.service import MqttService
from edgevl.records import with_questions
from edgevl.rules import Rule, RulesFile
from edgevl.spool.hand import Hand
from edgevl.spool.store import Spool
from edgevl.worker.supervisor import Finished, Lost, WorkerSupervisor

log = logging.getLogger(__name__)

# A job present at this many worker deaths is failed: a poison image is tried twice, never forever.
WORKER_ATTEMPTS = 2
EXIT_FAILED = 1  # an unexpected error: systemd restarts, and the inputs in hand count a death
EXIT_WORKER_GAVE_UP = 3
# People waiting on HTTP go first, but after this many HTTP jobs in a row a waiting file or
# MQTT frame gets its turn: looping clients cannot starve the folders.
HTTP_STREAK = 3

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
        self.config, self.rules = check(config_path, starting=True)
        try:
            create_folders(self.rules)
        except OSError as exc:
            raise ConfigError(f"{self.config.rules}: a watched folder cannot be created: {exc}") from None
        config = self.config
        self.wake = threading.Event()
        self.stop_requests = 0
        self.reload_requested = False
        self.notifier = Notifier()
        self.hand = Hand(config.state_dir / "in-hand.json")
        self.spool = Spool(config.spool_dir, self.hand)
        self.supervisor = WorkerSupervisor(config, self.wake)
        self.http_queue = HttpQueue(config.http.max_waiting, self.wake)
        self.http_running: dict[str, HttpJob] = {}
        self._http_streak = 0
        self.watcher = FolderWatcher(self.rules.rules, config.folders.settle_ms, config.folders.poll_interval,
                                     config.folders.rescan_interval, self.wake)
        self.status = Status(config, self.supervisor, self.spool, self.watcher, self.http_queue,
                             RecentRecords(config.http.recent_results))
        self.metrics = Metrics(config.model.id, config.model.precision, self.supervisor.health, self.status.queued)
        self.status.metrics = self.metrics
        self.retention = Retention(config.retention, config.folders, config.state_dir,
                                   lambda: [f for r in self.rules.rules for f in r.folders])
        self.status.retention = self.retention.counts
        self.metrics.watch_retention(self.retention.counts)
        self.delivery = Delivery(self.spool, config.folders, config.device_id, self.hand, self.status.record_done)
        self.intake = Intake(config, self.spool, self.hand, self.watcher, self.delivery, self.rule)
        self.mqtt: MqttService | None = None
        if config.mqtt.enabled:
            self.mqtt = MqttService(config, self.rules.rules, self.spool, self.hand, self.wake,
                                    self.status.mqtt_fields)
            self.status.mqtt = self.mqtt
            mqtt = self.mqtt
            self.metrics.watch_mqtt(lambda: mqtt.link.connected, lambda: len(mqtt.outbox))
            self.delivery.publisher = self.mqtt
        self.http: HttpServer | None = None
        if config.http.listen:
            backend = Backend(config.device_id, lambda: self.rules.rules, self.http_queue, self.status.recent,
                              self.status.health, self.status.document, self.metrics, config.model.max_pixels,
                              lambda: [p for p in (config.folders.archive, config.folders.failed) if p is not None])
            self.http = HttpServer(make_app(backend, config.http, config.http.token()), config.http)

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
            log.info("edgevl %s starting: %d rules, model %s (%s), %d jobs in the spool", __version__,
                     len(self.rules.rules), config.model.id, config.model.precision, self.spool.count())
            quarantine_poison(self.hand, self.spool, self.rules, self.config.device_id)
            stack.enter_context(self.supervisor)
            if self.http is not None:
                # Up while the model loads: /healthz says so, and requests wait for it.
                stack.enter_context(self.http)
                # Runs before the server stops: the requests still waiting get their answer.
                stack.callback(self._close_http)
            self.notifier.status("loading the model")
            if not self.supervisor.wait_ready(lambda: self.stop_requests > 0):
                log.info("stop requested while loading the model")
                return 0
            stack.enter_context(self.watcher)
            self.status.watching = True
            stack.enter_context(self.retention)
            if self.mqtt is not None:
                stack.enter_context(self.mqtt)
            elif any(r.topics for r in self.rules.rules):
                log.warning("rules name MQTT topics but [mqtt] host is empty: those topics are not read")
            self.notifier.ready(self.status.text())
            log.info("ready: watching %d folders", sum(len(r.folders) for r in self.rules.rules))
            try:
                return self._loop()
            except Exception:
                # A fault of edgevl itself: systemd restarts it, and whatever input was in hand
                # counts a death (two in a row and it is quarantined at the next start).
                log.critical("edgevl stops on an unexpected error", exc_info=True)
                self.notifier.stopping("failed: an unexpected error (see the log)")
                return EXIT_FAILED

    # the loop

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
                self._begin_stop()
            if self.reload_requested:
                self.reload_requested = False
                self._reload()

            for event in self.supervisor.poll(now):
                if isinstance(event, Lost):
                    self._lost(event)
                elif event.key in self.http_running:
                    self._finish_http(event.key, event)
                else:
                    self.delivery.deliver(event.key, event.record, event.alarm_jpeg)
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
                    self.status.record_done(record)
            if now >= next_status:
                self.notifier.status(self.status.text())
                next_status = now + config.daemon.status_interval
            # Fed while the loop runs and the worker is idle, loading in time or making
            # progress; a stuck worker stops the pings until it has been replaced.
            self.notifier.watchdog(self.supervisor.healthy(now))
            busy = self.supervisor.busy or not self.supervisor.ready
            self.wake.wait(0.5 if busy else min(0.5, max(0.02, self.watcher.next_settle_in())))

    def _begin_stop(self) -> None:
        self.notifier.stopping(f"stopping: finishing {self.supervisor.current or 'nothing'}")
        self.status.stopping = True
        if self.mqtt is not None:
            self.mqtt.stopping()
        for job in self.http_queue.close():
            job.future.set_result(job.job.error("stopping", "edgevl is stopping"))
        log.info("stop requested: taking no more work, finishing the current image (at most %.0f s)",
                 self.config.daemon.stop_timeout)

    # scheduling

    def _start_next(self) -> None:
        if self._http_streak < HTTP_STREAK and self._start_http():
            self._http_streak += 1
        elif self._start_batch():
            self._http_streak = 0
        elif self._start_http():  # nothing else waits
            self._http_streak += 1

    def _start_http(self) -> bool:
        http = self.http_queue.take()
        if http is None:
            return False
        self.http_running[http.key] = http
        try:
            self.supervisor.submit(http.key, http.job, http.data, http.rule)
        except Exception as exc:
            log.exception("cannot hand HTTP job %s to the model worker", http.key)
            self.http_running.pop(http.key, None)
            record = http.job.error("internal_error", f"edgevl could not run this request: {type(exc).__name__}")
            self.status.record_done(record)
            http.future.set_result(record)
        return True

    def _start_batch(self) -> bool:
        """Up to max_frames waiting jobs to the worker at once; False when nothing waited."""
        works = self.intake.batch(self.supervisor.max_frames)
        if works is None:
            return False
        if works:
            with self.hand.holding(*(f"job:{work.key}" for work in works)):
                try:
                    self.supervisor.submit_batch(works)
                except Exception as exc:  # each travelled alone in intake.work: this is edgevl's own fault
                    log.exception("cannot hand %d jobs to the model worker", len(works))
                    for work in works:
                        self.delivery.deliver(work.key, work.job.error(
                            "internal_error", f"edgevl could not run this job: {type(exc).__name__}: {exc}"))
        return True

    def _lost(self, event: Lost) -> None:
        """The worker died on these jobs: each is tried again (alone), then failed with the reason."""
        for key in event.keys:
            if key in self.http_running:
                self._finish_http(key, event)
                continue
            extra = {"EDGEVL_JOB": key}
            with self.hand.holding(f"job:{key}"):
                try:
                    job = self.spool.load(key)
                    failures = job.add_worker_failure(event.code)
                except OSError as exc:
                    log.error("cannot record the worker's failure on job %s: %s", key, exc, extra=extra)
                    continue
                except ValueError:
                    self.delivery.deliver(key, None)  # damaged: delivery sets it aside with an error record
                    continue
                if len(failures) < WORKER_ATTEMPTS:
                    log.warning("job %s will be tried once more (%s: %s)", key, event.code, event.detail, extra=extra)
                    continue
                message = f"{_LOST_MESSAGES[event.code]}, {len(failures)} times; last time {event.detail}"
                self.delivery.deliver(key, job.job(self.config.device_id).error(event.code, message))

    # HTTP

    def _finish_http(self, key: str, event: Finished | Lost) -> None:
        job = self.http_running.pop(key)
        if isinstance(event, Finished):
            record = event.record
        else:
            record = job.job.error(event.code, f"{_LOST_MESSAGES[event.code]}; {event.detail}")
        if job.rule.name == ADHOC_RULE:
            record = with_questions(record, {q.id: q.ask for q in job.rule.questions})
        self.status.record_done(record)
        if not job.future.done():
            job.future.set_result(record)

    def _close_http(self) -> None:
        for job in [*self.http_queue.close(), *self.http_running.values()]:
            if not job.future.done():
                job.future.set_result(job.job.error("stopping", "edgevl stopped before answering"))
        self.http_running.clear()

    # reload

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            rules = check_rules(self.config, self.config_path)
            create_folders(rules)
        except OSError as exc:
            log.error("reload refused, keeping the current rules: a folder cannot be created: %s", exc)
            self.notifier.reloaded(self.status.text())
            return
        except ConfigError as exc:
            log.error("reload refused, keeping the current rules:\n%s", exc.message)
            self.notifier.reloaded(self.status.text())
            return
        self.rules = rules
        self.watcher.set_rules(rules.rules)
        if self.mqtt is not None:
            self.mqtt.set_rules(rules.rules)
        log.info("reloaded %d rules from %s", len(rules.rules), self.config.rules)
        self.notifier.reloaded(self.status.text())


def run(config_path: Path, log_level: str | None = None) -> int:
    """The daemon until it stops; ``log_level`` (from the command line) overrides ``[log] level``."""
    daemon = Daemon(config_path)
    set_level(log_level or daemon.config.log.level)
    code = daemon.run()
    logging.shutdown()
    return code
