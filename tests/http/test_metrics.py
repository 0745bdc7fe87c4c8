"""The metrics text as Prometheus parses it: names, types and labels by its conventions."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from edgevl.http.metrics import Metrics
from edgevl.records import Job


def test_counters_gauges_and_alarms_per_rule_and_question() -> None:
    health = {"rss": 5e8, "memory_limit": 1e10, "state": "busy", "restarts": 2}
    metrics = Metrics("model", "int8", lambda: health, lambda: 7)
    connected = [True]
    metrics.watch_mqtt(lambda: connected[0], lambda: 3)
    job = Job(rule="weld", source={"kind": "folder", "path": "/in/a.jpg"}, device_id="d")
    answers = {"defect": {"type": "yes_no", "value": True, "p_yes": 0.9, "confidence": 0.9, "alarm": True},
               "crack": {"type": "yes_no", "value": False, "p_yes": 0.1, "confidence": 0.9, "alarm": False}}
    for _ in range(3):
        metrics.observe(job.result({"sha256": "", "width": 1, "height": 1, "format": "PNG"},
                                   {"id": "model", "precision": "int8"}, answers, {"total": 1000.0}))
    metrics.observe(Job(rule="gate", source={"kind": "mqtt", "topic": "t"}).error("image_unreadable", "cut"))
    connected[0] = False

    families = {f.name: f for f in text_string_to_metric_families(metrics.text().decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert {name: families[name].type for name in ("edgevl_jobs", "edgevl_alarms", "edgevl_worker_restarts")} == {
        "edgevl_jobs": "counter", "edgevl_alarms": "counter", "edgevl_worker_restarts": "counter"}
    assert samples[("edgevl_alarms_total", (("question", "defect"), ("rule", "weld")))] == 3
    assert ("edgevl_alarms_total", (("question", "crack"), ("rule", "weld"))) not in samples
    assert samples[("edgevl_jobs_total", (("outcome", "answered"), ("source", "folder")))] == 3
    assert samples[("edgevl_jobs_total", (("outcome", "image_unreadable"), ("source", "mqtt")))] == 1
    assert samples[("edgevl_worker_restarts_total", ())] == 2
    assert samples[("edgevl_mqtt_connected", ())] == 0, "read at each scrape"
    assert samples[("edgevl_mqtt_outbox_depth", ())] == 3
    assert samples[("edgevl_queue_depth", ())] == 7
    assert {k[1] for k in samples if k[0] == "edgevl_last_result_timestamp_seconds"} == {
        (("rule", "gate"),), (("rule", "weld"),)}
    assert not [name for name, _ in samples if name.endswith("_created")]
