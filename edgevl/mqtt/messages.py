"""What edgevl publishes over MQTT: topics and payloads, built from records and rules.

Everything lives under the base topic ``<topic_prefix>/<device_id>``:

- ``results/<rule>``: the full result record (QoS 1, not retained);
- ``answers/<rule>/<question>``: one small retained message per answer, for dashboards;
- ``errors``: error records, of images and of input messages that were not images;
- ``status``: retained ``online`` / ``stopping`` / ``offline`` (the last will).
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from typing import Any

from edgevl import __version__
from edgevl.records import Record, all_answers, is_error, to_json
from edgevl.spool.job import Reply

JSON = "application/json"


@dataclass(frozen=True)
class OutMessage:
    """One message to publish; plain data so that the outbox can keep it on disk."""

    topic: str
    payload: str
    qos: int
    retain: bool = False
    correlation: str | None = None  # base64 of MQTT v5 correlation data
    content_type: str = JSON  # anything else is binary, kept in ``payload`` as base64 text

    @property
    def payload_bytes(self) -> bytes:
        return self.payload.encode() if self.content_type == JSON else base64.b64decode(self.payload)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutMessage:
        return cls(topic=str(data["topic"]), payload=str(data["payload"]), qos=int(data["qos"]),
                   retain=bool(data.get("retain", False)), correlation=data.get("correlation"),
                   content_type=str(data.get("content_type", JSON)))

    @property
    def correlation_bytes(self) -> bytes | None:
        return None if self.correlation is None else base64.b64decode(self.correlation)


def dumps(data: dict[str, Any]) -> str:
    """Compact JSON, as every payload edgevl publishes is written."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


class Topics:
    def __init__(self, prefix: str, device_id: str) -> None:
        self.base = f"{prefix.rstrip('/')}/{device_id}"
        self.status = f"{self.base}/status"
        self.errors = f"{self.base}/errors"

    def results(self, rule: str) -> str:
        return f"{self.base}/results/{rule}"

    def answer(self, rule: str, question: str) -> str:
        return f"{self.base}/answers/{rule}/{question}"

    def alarm_image(self, rule: str) -> str:
        return f"{self.base}/alarm_image/{rule}"


def record_messages(topics: Topics, record: Record, qos: int, reply: Reply | None = None,
                    alarm_jpeg: bytes | None = None) -> list[OutMessage]:
    """The messages one job's record produces, in the order they are published."""
    payload = to_json(record)
    if is_error(record):
        messages = [OutMessage(topics.errors, payload, qos)]
    else:
        messages = [OutMessage(topics.results(record["rule"]), payload, qos)]
        # A document's pages are published in order, each with its number: the retained value is its last
        # page's, and a subscriber that follows the topic sees every page.
        for page, question, answer in all_answers(record):
            small: dict[str, Any] = {"value": answer.get("value"), "confidence": answer.get("confidence"),
                                     "alarm": answer.get("alarm"), "job_id": record["job_id"],
                                     "ts": record["finished_at"]}
            if page is not None:
                small["page"] = page
            if "p_yes" in answer:
                small["p_yes"] = answer["p_yes"]
            if "error" in answer:
                small["error"] = answer["error"]
            messages.append(OutMessage(topics.answer(record["rule"], question), dumps(small), qos, retain=True))
    if alarm_jpeg is not None and not is_error(record):
        messages.append(OutMessage(topics.alarm_image(record["rule"]), base64.b64encode(alarm_jpeg).decode(), qos,
                                   retain=True, content_type="image/jpeg"))
    if reply and reply.get("topic"):
        messages.append(OutMessage(reply["topic"], payload, qos, correlation=reply.get("correlation")))
    return messages


def status_payload(state: str, **fields: Any) -> str:
    return dumps({"state": state, "version": __version__, **fields})
