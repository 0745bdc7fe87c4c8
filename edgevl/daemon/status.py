"""What the daemon tells about itself: counts, health, the status line, the status document.

One place reads the parts (the worker's health, the queues, MQTT) for systemd's
STATUS=, the retained MQTT status, ``/v1/status`` and ``/healthz``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from edgevl import __version__
from edgevl.config import Config
from edgevl.folders.watcher import FolderWatcher
from edgevl.http.jobs import HttpQueue, RecentRecords
from edgevl.records import Record, is_error
from edgevl.spool.store import Spool
from edgevl.worker.memcap import format_bytes
from edgevl.worker.supervisor import WorkerSupervisor

if TYPE_CHECKING:
    from edgevl.daemon.retention import Counts
    from edgevl.http.metrics import Metrics
    from edgevl.mqtt.service import MqttService


class Status:
    def __init__(self, config: Config, supervisor: WorkerSupervisor, spool: Spool, watcher: FolderWatcher,
                 http_queue: HttpQueue, recent: RecentRecords) -> None:
        self.config = config
        self.supervisor = supervisor
        self.spool = spool
        self.watcher = watcher
        self.http_queue = http_queue
        self.recent = recent
        self.counts: Counter[str] = Counter()
        self.stopping = False
        self.watching = False  # the folders are watched (after the model loaded)
        self.metrics: Metrics | None = None
        self.mqtt: MqttService | None = None
        self.retention: Counts | None = None
        self.last_error: dict[str, str] | None = None

    def record_done(self, record: Record) -> None:
        """Count a finished job of any source."""
        self.counts["failed" if is_error(record) else "done"] += 1
        if is_error(record):
            self.last_error = {"code": record["error"]["code"], "message": record["error"]["message"],
                               "rule": record["rule"], "job_id": record["job_id"], "at": record["finished_at"]}
        self.recent.add(record)
        if self.metrics is not None:
            self.metrics.observe(record)

    def queued(self) -> int:
        waiting = self.watcher.waiting() if self.watching else 0
        return waiting + self.spool.count() + len(self.http_queue)

    def counters(self) -> dict[str, int]:
        return {"queued": self.queued(), "done": self.counts["done"], "failed": self.counts["failed"]}

    def mqtt_fields(self) -> dict[str, Any]:
        """The counters and the worker's health, for the retained MQTT status."""
        h = self.supervisor.health()
        worker = {"state": h["state"], "restarts": h["restarts"], "rss": h["rss"], "memory_limit": h["memory_limit"]}
        return {**self.counters(), "worker": worker, "last_error": self.last_error}

    def health(self) -> tuple[bool, dict[str, Any]]:
        """For /healthz: the worker is up and the inputs are read."""
        worker = self.supervisor.health()["state"]
        inputs = "starting" if not self.watching else "watching" if self.watcher.alive else "down"
        detail: dict[str, Any] = {"worker": worker, "inputs": inputs, "stopping": self.stopping}
        if self.mqtt is not None:
            detail["mqtt"] = "connected" if self.mqtt.link.connected else "disconnected"
        return worker in ("ready", "busy") and inputs == "watching" and not self.stopping, detail

    def document(self) -> dict[str, Any]:
        """For /v1/status."""
        h = self.supervisor.health()
        worker = {k: h[k] for k in ("pid", "state", "restarts", "rss", "memory_limit", "job", "job_seconds", "standby")}
        worker["up_seconds"] = round(time.time() - h["up_since"], 1)
        status: dict[str, Any] = {
            "device_id": self.config.device_id, "version": __version__,
            "state": "stopping" if self.stopping else "online",
            "model": {"id": self.config.model.id, "precision": self.config.model.precision},
            **self.counters(), "worker": worker,
        }
        if self.mqtt is not None:
            status["mqtt"] = {"connected": self.mqtt.link.connected, "outbox": len(self.mqtt.outbox)}
        if self.retention is not None:
            status["retention"] = self.retention.as_dict()
        return status

    def text(self) -> str:
        """systemd's STATUS= line."""
        counts = self.counters()
        text = f"queued {counts['queued']}, done {counts['done']}, failed {counts['failed']}"
        h = self.supervisor.health()
        text += (f"; worker {h['pid']} {h['state']}, up {time.time() - h['up_since']:.0f} s, "
                 f"restarts {h['restarts']}, RSS {format_bytes(h['rss'])} of {format_bytes(h['memory_limit'])}")
        if h["job"]:
            text += f", on {h['job']} for {h['job_seconds']:.0f} s"
        if h["standby"]:
            text += f", standby {h['standby']}"
        if self.mqtt is not None:
            text += f"; {self.mqtt.status_text()}"
        return text
