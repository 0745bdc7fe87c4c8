"""Prometheus metrics of the daemon, in a registry of its own (nothing global, nothing at import time)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edgevl import __version__
from edgevl.records import Record, is_error

if TYPE_CHECKING:
    from edgevl.daemon.retention import Counts

# Seconds; the stages of one image on a 2-core CPU run from milliseconds (decode) to a minute (a big frame).
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    def __init__(self, model_id: str, precision: str, health: Callable[[], dict[str, Any]],
                 queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter("edgevl_jobs", "Images finished, by source and outcome (answered or an error code).",
                            ["source", "outcome"], registry=self.registry)
        self.stage = Histogram("edgevl_stage_seconds", "Seconds per stage of an answered image.", ["stage"],
                               buckets=BUCKETS, registry=self.registry)
        Gauge("edgevl_queue_depth", "Images waiting for the model (folders, spool, HTTP).",
              registry=self.registry).set_function(lambda: float(queue_depth()))
        Gauge("edgevl_worker_restarts", "Times the model worker was replaced since the daemon started.",
              registry=self.registry).set_function(lambda: float(health()["restarts"]))
        Gauge("edgevl_worker_rss_bytes", "Resident size of the model worker.",
              registry=self.registry).set_function(lambda: float(health()["rss"]))
        Gauge("edgevl_worker_memory_limit_bytes", "model.memory_limit of the worker.",
              registry=self.registry).set_function(lambda: float(health()["memory_limit"]))
        Gauge("edgevl_worker_up", "1 while the model worker is loaded (ready or busy).",
              registry=self.registry).set_function(lambda: float(health()["state"] in ("ready", "busy")))
        Info("edgevl_model", "The model answering.", registry=self.registry).info(
            {"id": model_id, "precision": precision, "version": __version__})

    def watch_retention(self, counts: Counts) -> None:
        """The retention sweeps' counts, read at each scrape."""
        self.registry.register(_RetentionCollector(counts))

    def observe(self, record: Record) -> None:
        source = record["source"].get("kind", "unknown")
        if is_error(record):
            self.jobs.labels(source, record["error"]["code"]).inc()
        else:
            self.jobs.labels(source, "answered").inc()
            for stage, ms in record["timings_ms"].items():
                self.stage.labels(stage).observe(ms / 1000)

    def text(self) -> bytes:
        return generate_latest(self.registry)


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
