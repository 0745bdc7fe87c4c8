"""Home Assistant discovery payloads, key by key against Home Assistant's documented MQTT keys, and
their templates rendered with Jinja as Home Assistant renders them."""

from __future__ import annotations

import json
import re
from typing import Any

import jinja2
import pytest

from edgevl.config import HttpSettings
from edgevl.mqtt.discovery import STATE_MAX, discovery_messages, object_id
from edgevl.mqtt.messages import Topics, record_messages
from edgevl.records import Job
from edgevl.rules import RulesFile

# https://www.home-assistant.io/integrations/mqtt/ (entity keys shared by every component, device and
# origin keys) and the binary_sensor.mqtt / sensor.mqtt pages.
COMMON = {"availability", "availability_mode", "availability_template", "availability_topic", "device",
          "default_entity_id", "enabled_by_default", "encoding", "entity_category", "entity_picture",
          "expire_after", "force_update", "icon", "json_attributes_template", "json_attributes_topic", "name",
          "object_id", "origin", "payload_available", "payload_not_available", "qos", "state_topic", "unique_id",
          "value_template"}
COMPONENT = {"binary_sensor": {"device_class", "off_delay", "payload_off", "payload_on"},
             "image": {"content_type", "image_encoding", "image_topic", "url_template", "url_topic"},
             "sensor": {"device_class", "last_reset_value_template", "options", "suggested_display_precision",
                        "state_class", "unit_of_measurement"}}
DEVICE = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model", "model_id",
          "name", "serial_number", "suggested_area", "sw_version", "via_device"}
ORIGIN = {"name", "sw_version", "support_url"}
AVAILABILITY = {"payload_available", "payload_not_available", "topic", "value_template"}
SENSOR_CLASSES = {None, "enum"}  # the device classes edgevl uses for sensors
STATE_CLASSES = {None, "measurement", "total", "total_increasing"}

RULES = RulesFile.model_validate({"rule": [
    {"name": "weld-seam", "alarm_image": True, "question": [
        {"id": "defect", "ask": "Defect?", "type": "yes_no", "alarm_above": 0.8},
        {"id": "present", "ask": "Part present?", "type": "yes_no"},
        {"id": "kind", "ask": "Which?", "type": "choice", "options": ["type-A", "type-B"]},
        {"id": "gap", "ask": "Gap?", "type": "number", "unit": "mm"},
        {"id": "label", "ask": "Read the label.", "type": "text"},
        {"id": "fields", "ask": "Fields?", "type": "json"}]},
    {"name": "weld_seam", "question": [{"id": "defect", "ask": "Defect?", "type": "yes_no"}]},
]}).rules
TOPICS = Topics("edgevl", "line3")


def _render(template: str, payload: dict[str, Any]) -> str:
    return jinja2.Environment().from_string(template).render(value_json=payload)


def _configs(url: str | None = "http://line3.local:8080/") -> dict[str, dict[str, Any]]:
    raw = discovery_messages(TOPICS, "homeassistant", "line3", "Qwen/Qwen3-VL-2B-Instruct", RULES, url)
    return {topic: json.loads(payload) for topic, payload in raw.items()}


def test_every_key_is_one_home_assistant_documents() -> None:
    configs = _configs()
    # entities per question, two yes/no with confidences, the alarm image, diagnostics
    assert len(configs) == 6 + 2 + 2 + 1 + 3
    for topic, config in configs.items():
        prefix, component, node, oid, last = topic.split("/")
        assert (prefix, node, last) == ("homeassistant", "edgevl_line3", "config")
        assert re.fullmatch(r"[A-Za-z0-9_-]+", oid), "what Home Assistant takes as an object id"
        assert set(config) <= COMMON | COMPONENT[component], topic
        assert set(config["device"]) <= DEVICE
        assert set(config["origin"]) <= ORIGIN
        assert all(set(a) <= AVAILABILITY for a in config["availability"])
        assert config["device"]["configuration_url"] == "http://line3.local:8080/"
        assert config["origin"]["name"] == "edgevl"
        if component == "sensor":
            assert config.get("device_class") in SENSOR_CLASSES
            assert config.get("state_class") in STATE_CLASSES
    ids = [c["unique_id"] for c in configs.values()]
    assert len(set(ids)) == len(ids), "weld-seam and weld_seam stay apart"
    assert object_id("weld-seam", "defect") != object_id("weld_seam", "defect")
    assert object_id("a_", "b") != object_id("a", "_b".lstrip("_"))


def test_each_answer_type_follows_home_assistants_conventions() -> None:
    c = {topic.split("/", 2)[2]: config for topic, config in _configs().items()}
    alarm = c["edgevl_line3/weld-seam_defect/config"]
    assert alarm["device_class"] == "problem"
    answer = {"value": False, "confidence": 0.7, "p_yes": 0.3, "alarm": True, "job_id": "j1", "ts": "t"}
    assert _render(alarm["value_template"], answer) == "ON", "follows the alarm, not the answer"
    plain = c["edgevl_line3/weld-seam_present/config"]
    assert "device_class" not in plain
    assert _render(plain["value_template"], answer) == "OFF", "follows the answer"
    confidence = c["edgevl_line3/weld-seam_defect_confidence/config"]
    assert (confidence["unit_of_measurement"], confidence["state_class"]) == ("%", "measurement")
    assert float(_render(confidence["value_template"], answer)) == pytest.approx(70.0)

    choice = c["edgevl_line3/weld-seam_kind/config"]
    assert (choice["device_class"], choice["options"]) == ("enum", ["type-A", "type-B"])
    assert _render(choice["value_template"], {"value": "type-B"}) == "type-B"
    number = c["edgevl_line3/weld-seam_gap/config"]
    assert (number["state_class"], number["unit_of_measurement"]) == ("measurement", "mm")
    assert _render(number["value_template"], {"value": 0.25}) == "0.25"
    assert _render(number["value_template"], {"value": None, "error": {"code": "number_not_found"}}) == ""

    text = c["edgevl_line3/weld-seam_label/config"]
    long_text = "A-113 " * 100
    assert _render(text["value_template"], {"value": long_text}) == long_text[:STATE_MAX]
    assert json.loads(_render(text["json_attributes_template"], {"value": long_text}))["value"] == long_text
    fields = c["edgevl_line3/weld-seam_fields/config"]
    state = _render(fields["value_template"], {"value": {"id": "A-113", "ok": True, "n": None}})
    assert json.loads(state) == {"id": "A-113", "ok": True, "n": None}, "JSON, not a Python repr"


def test_diagnostics_read_the_status_topic() -> None:
    c = {topic.split("/", 2)[2]: config for topic, config in _configs(None).items()}
    status = {"state": "online", "queued": 4, "failed": 2, "done": 9,
              "last_error": {"code": "image_unreadable", "message": "cut", "rule": "weld-seam"}}
    queue = c["edgevl_line3/_queue_depth/config"]
    assert queue["state_topic"] == TOPICS.status
    assert queue["entity_category"] == "diagnostic"
    assert _render(queue["value_template"], status) == "4"
    assert _render(c["edgevl_line3/_failed_jobs/config"]["value_template"], status) == "2"
    last = c["edgevl_line3/_last_error/config"]
    assert _render(last["value_template"], status) == "image_unreadable: cut"
    assert _render(last["value_template"], {**status, "last_error": None}) == "none"
    assert all("configuration_url" not in config["device"] for config in c.values())
    avail = c["edgevl_line3/_queue_depth/config"]["availability"][0]
    assert _render(avail["value_template"], {"state": "stopping"}) == "offline"


def test_templates_read_the_messages_edgevl_publishes() -> None:
    """The answer messages, as published, rendered through the discovery templates."""
    configs = {topic.split("/", 2)[2]: config for topic, config in _configs().items()}
    job = Job(rule="weld-seam", source={"kind": "folder", "path": "/in/a.jpg"}, device_id="line3", job_id="j1")
    record = job.result({"sha256": "", "width": 1, "height": 1, "format": "PNG"}, {"id": "m", "precision": "int8"}, {
        "defect": {"type": "yes_no", "value": True, "p_yes": 0.91, "confidence": 0.91, "alarm": True},
        "gap": {"type": "number", "value": 1.5, "text": "1.5 mm"},
        "fields": {"type": "json", "value": [1, "a"], "text": '[1, "a"]'}}, {})
    published = {m.topic: json.loads(m.payload) for m in record_messages(TOPICS, record, 1)}
    for key, expected in (("weld-seam_defect", "ON"), ("weld-seam_gap", "1.5"), ("weld-seam_fields", '[1, "a"]')):
        config = next(v for k, v in configs.items() if k == f"edgevl_line3/{key}/config")
        assert _render(config["value_template"], published[config["state_topic"]]) == expected


@pytest.mark.parametrize(("listen", "public", "url"), [
    ("127.0.0.1:8080", "", "http://127.0.0.1:8080/"),
    ("0.0.0.0:8080", "", None),
    ("0.0.0.0:8080", "https://edgevl.line3.example/", "https://edgevl.line3.example/"),
    ("[::1]:9000", "", "http://[::1]:9000/"),
    ("", "", None),
])
def test_the_device_links_to_the_page(listen: str, public: str, url: str | None) -> None:
    assert HttpSettings(listen=listen, public_url=public).page_url() == url


def test_the_alarm_frame_is_an_image_entity_on_its_retained_topic() -> None:
    c = {topic.split("/", 1)[1]: config for topic, config in _configs().items()}
    image = c["image/edgevl_line3/weld-seam_alarm_image/config"]
    assert (image["image_topic"], image["content_type"]) == (TOPICS.alarm_image("weld-seam"), "image/jpeg")
    assert "state_topic" not in image
    assert not [k for k in c if k.startswith("image/") and "weld__seam" in k], "only rules that ask for it"
