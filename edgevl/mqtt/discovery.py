"""Home Assistant MQTT discovery: one device per appliance, entities by Home Assistant's conventions.

Per question: a yes/no question is a ``binary_sensor`` (``device_class: problem`` following
``alarm`` when the question has ``alarm_above``, else following the answer) with its confidence
as a percentage sensor; a choice is an ``enum`` sensor with its options; a number is a
measurement with the rule's unit; text and JSON are sensors whose state is the answer cut to
Home Assistant's 255 characters, with the whole answer in the attributes. A rule with
``alarm_image`` is an ``image`` entity showing the last alarm's frame. Per device: the queue
depth, the failed jobs and the last error as diagnostic entities. Every template emits JSON with
``tojson`` where it passes structured values on, never a Python representation.
"""

from __future__ import annotations

from typing import Any

from edgevl import __version__
from edgevl.mqtt.messages import Topics, dumps
from edgevl.questions import Question
from edgevl.rules import Rule

STATE_MAX = 255  # Home Assistant refuses longer states
_AVAILABLE = "{{ 'online' if value_json.state == 'online' else 'offline' }}"


def object_id(*parts: str) -> str:
    """A discovery object id from names of ``[A-Za-z0-9_.-]``, distinct for distinct names.

    Underscores are doubled and dots spelled out, so that one underscore can join the parts:
    ``weld-seam`` and ``weld_seam`` stay two entities (names never start with an underscore, so
    a run of three is a doubled one and a joint).
    """
    return "_".join(p.replace("_", "__").replace(".", "_2e") for p in parts)


def _question_entities(q: Question, rule: Rule) -> list[tuple[str, str, dict[str, Any]]]:
    """(component, object id suffix, the entity's own keys) for one question."""
    name = f"{rule.name} {q.id}"
    if q.type == "yes_no":
        if q.alarm_above is not None:
            binary = {"name": name, "device_class": "problem",
                      "value_template": "{{ 'ON' if value_json.alarm else 'OFF' }}"}
        else:
            binary = {"name": name, "value_template": "{{ 'ON' if value_json.value else 'OFF' }}"}
        confidence = {"name": f"{name} confidence", "unit_of_measurement": "%", "state_class": "measurement",
                      "suggested_display_precision": 1,
                      "value_template": "{{ (value_json.confidence * 100) | round(1) }}"}
        return [("binary_sensor", "", binary), ("sensor", "_confidence", confidence)]
    if q.type == "choice":
        return [("sensor", "", {"name": name, "device_class": "enum", "options": list(q.options),
                                "value_template": "{{ value_json.value }}"})]
    if q.type == "number":
        number: dict[str, Any] = {"name": name, "state_class": "measurement",
                                  "value_template": "{{ value_json.value if value_json.value is not none else '' }}"}
        if q.unit:
            number["unit_of_measurement"] = q.unit
        return [("sensor", "", number)]
    if q.type == "json":
        template = f"{{{{ (value_json.value | tojson)[:{STATE_MAX}] }}}}"
    else:
        template = f"{{{{ (value_json.value if value_json.value is not none else '')[:{STATE_MAX}] }}}}"
    return [("sensor", "", {"name": name, "value_template": template,
                            "json_attributes_template": "{{ value_json | tojson }}"})]


def _diagnostics() -> list[tuple[str, dict[str, Any]]]:
    last_error = (f"{{{{ ((value_json.last_error.code ~ ': ' ~ value_json.last_error.message)[:{STATE_MAX}]) "
                  "if value_json.last_error else 'none' }}")
    return [
        ("queue_depth", {"name": "queue depth", "state_class": "measurement",
                         "value_template": "{{ value_json.queued }}"}),
        ("failed_jobs", {"name": "failed jobs", "state_class": "total_increasing",
                         "value_template": "{{ value_json.failed }}"}),
        ("last_error", {"name": "last error", "value_template": last_error,
                        "json_attributes_template": "{{ (value_json.last_error or {}) | tojson }}"}),
    ]


def discovery_messages(topics: Topics, prefix: str, device_id: str, model_id: str, rules: tuple[Rule, ...],
                       configuration_url: str | None = None) -> dict[str, str]:
    """topic -> retained config, for every entity of the appliance."""
    device: dict[str, Any] = {"identifiers": [f"edgevl_{device_id}"], "name": f"edgevl {device_id}",
                              "manufacturer": "edgevl", "model": model_id, "sw_version": __version__}
    if configuration_url:
        device["configuration_url"] = configuration_url
    common = {"device": device, "origin": {"name": "edgevl", "sw_version": __version__},
              "availability": [{"topic": topics.status, "value_template": _AVAILABLE}]}
    node = object_id(device_id)
    out = {}
    for rule in rules:
        for q in rule.questions:
            state = topics.answer(rule.name, q.id)
            for component, suffix, keys in _question_entities(q, rule):
                oid = object_id(rule.name, q.id) + suffix
                config = {**keys, "unique_id": f"edgevl:{device_id}:{rule.name}:{q.id}{suffix}",
                          "state_topic": state, "json_attributes_topic": state, **common}
                if "json_attributes_template" not in config:
                    config["json_attributes_template"] = "{{ value_json | tojson }}"
                out[f"{prefix}/{component}/edgevl_{node}/{oid}/config"] = dumps(config)
        if rule.alarm_image:
            config = {"name": f"{rule.name} alarm image", "unique_id": f"edgevl:{device_id}:{rule.name}:alarm_image",
                      "image_topic": topics.alarm_image(rule.name), "content_type": "image/jpeg", **common}
            out[f"{prefix}/image/edgevl_{node}/{object_id(rule.name)}_alarm_image/config"] = dumps(config)
    for suffix, keys in _diagnostics():
        config = {**keys, "unique_id": f"edgevl:{device_id}:{suffix}", "state_topic": topics.status,
                  "entity_category": "diagnostic", **common}
        # A leading underscore: no question's object id starts with one.
        out[f"{prefix}/sensor/edgevl_{node}/_{suffix}/config"] = dumps(config)
    return out


def legacy_topics(prefix: str, device_id: str, rules: tuple[Rule, ...]) -> set[str]:
    """Where edgevl 0.1's first discovery scheme put its configs (dashes and dots as underscores), to be
    cleared: Home Assistant would otherwise keep those entities beside the new ones."""
    def old(*parts: str) -> str:
        return "_".join(p.replace(".", "_").replace("-", "_") for p in parts)

    return {f"{prefix}/{'binary_sensor' if q.type == 'yes_no' else 'sensor'}/edgevl_{old(device_id)}/"
            f"{old(rule.name, q.id)}/config" for rule in rules for q in rule.questions}
