"""Prometheus metrics of the daemon, in a registry of its own (nothing global, nothing at import time)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edgevl import __version__
from edgevl.records import Record, all_answers, is_error

if TYPE_CHECKING:
    from edgevl.daemon.retention import Counts

# Seconds; the stages of one image on a 2-core CPU run from milliseconds (decode) to a minute (a big frame).
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    def __init__(self, model_id: str, precision: str, health: Callable[[], dict[str, Any]],
                 queue_depth: Callable[[], int]) -> None:
        # A _created series beside every counter doubles the series and no dashboard reads it.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter("edgevl_jobs", "Images finished, by source and outcome (answered or an error code).",
                            ["source", "outcome"], registry=self.registry)
        self.alarms = Counter("edgevl_alarms", "Answers that raised an alarm, by rule and question.",
                              ["rule", "question"], registry=self.registry)
        self.last_result = Gauge("edgevl_last_result_timestamp_seconds",
                                 "When the last record of a rule was finished (Unix time).", ["rule"],
                                 registry=self.registry)
        self.stage = Histogram("edgevl_stage_seconds", "Seconds per stage of an answered image.", ["stage"],
                               buckets=BUCKETS, registry=self.registry)
        Gauge("edgevl_queue_depth", "Images waiting for the model (folders, spool, HTTP).",
              registry=self.registry).set_function(lambda: float(queue_depth()))
        Gauge("edgevl_worker_rss_bytes", "Resident size of the model worker.",
              registry=self.registry).set_function(lambda: float(health()["rss"]))
        Gauge("edgevl_worker_memory_limit_bytes", "model.memory_limit of the worker.",
              registry=self.registry).set_function(lambda: float(health()["memory_limit"]))
        Gauge("edgevl_worker_up", "1 while the model worker is loaded (ready or busy).",
              registry=self.registry).set_function(lambda: float(health()["state"] in ("ready", "busy")))
        self.registry.register(_Read("edgevl_worker_restarts", "Times the model worker was replaced since the "
                                     "daemon started.", "counter", lambda: float(health()["restarts"])))
        Info("edgevl_model", "The model answering.", registry=self.registry).info(
            {"id": model_id, "precision": precision, "version": __version__})

    def watch_mqtt(self, connected: Callable[[], bool], outbox: Callable[[], int]) -> None:
        self.registry.register(_Read("edgevl_mqtt_connected", "1 while connected to the MQTT broker.", "gauge",
                                     lambda: float(connected())))
        self.registry.register(_Read("edgevl_mqtt_outbox_depth", "Records waiting in the MQTT outbox.", "gauge",
                                     lambda: float(outbox())))

    def watch_retention(self, counts: Counts) -> None:
        """The retention sweeps' counts, read at each scrape."""
        self.registry.register(_RetentionCollector(counts))

    def observe(self, record: Record) -> None:
        source = record["source"].get("kind", "unknown")
        self.last_result.labels(record["rule"]).set(time.time())
        if is_error(record):
            self.jobs.labels(source, record["error"]["code"]).inc()
        else:
            self.jobs.labels(source, "answered").inc()
            for stage, ms in record["timings_ms"].items():
                self.stage.labels(stage).observe(ms / 1000)
            for _, question, answer in all_answers(record):
                if answer.get("alarm"):
                    self.alarms.labels(record["rule"], question).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _Read(Collector):
    """One value read at each scrape, as a counter or a gauge."""

    def __init__(self, name: str, documentation: str, kind: str, read: Callable[[], float]) -> None:
        self.name, self.documentation, self.kind, self.read = name, documentation, kind, read

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        family = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        yield family(self.name, self.documentation, value=self.read())


class _RetentionCollector(Collector):
    def __init__(self, counts: Counts) -> None:
        self.counts = counts

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        files = CounterMetricFamily("edgevl_retention_deleted_files", "Files the retention sweeps deleted, by folder.",
                                    labels=["folder"])
        size = CounterMetricFamily("edgevl_retention_deleted_bytes", "Bytes the retention sweeps deleted, by folder.",
                                   labels=["folder"])
        held = GaugeMetricFamily("edgevl_output_folder_bytes", "Bytes an output folder held at the last sweep.",
                                 labels=["folder"])
        for kind, c in self.counts.folders.items():
            files.add_metric([kind], c.deleted_files)
            size.add_metric([kind], c.deleted_bytes)
            held.add_metric([kind], c.size_bytes)
        yield from (files, size, held)
