"""MQTT input messages → spool jobs, or error records for what is not an image.

A payload is raw image bytes, or a JSON envelope ``{"id", "image": base64,
"meta": {…}}`` (MQTT v5 content type ``application/json``, or a payload that
starts with ``{``).  The job id comes from the envelope, else from the v5
correlation data, else is generated; it names files, so it is checked, and
nothing from ``meta`` is ever used as a path.

``take`` runs on the MQTT thread and returns only once the image is durable in
the spool; the message is acknowledged after that, so the broker redelivers
whatever a crash or a full disk kept from the spool.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from paho.mqtt.client import topic_matches_sub

from edgevl.errors import EdgevlError, ImageError
from edgevl.images import accepted_suffix
from edgevl.mqtt_messages import JSON, Topics, record_messages
from edgevl.outbox import Outbox
from edgevl.records import Job, new_job_id, now_rfc3339
from edgevl.rules import Rule
from edgevl.seen import SeenIds
from edgevl.spool import Spool

log = logging.getLogger(__name__)

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_META = 16 << 10
ENVELOPE_KEYS = {"id", "image", "meta"}

Outcome = Literal["accepted", "duplicate", "rejected", "ignored"]


@dataclass(frozen=True)
class Inbound:
    """An input message as the MQTT thread received it."""

    topic: str
    payload: bytes
    content_type: str | None = None
    correlation: bytes | None = None
    response_topic: str | None = None


class Rejected(EdgevlError):
    code = "bad_message"


def _correlation_id(data: bytes | None) -> str | None:
    if not data:
        return None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if SAFE_ID.match(text):
        return text
    return data.hex() if len(data) <= 64 else None


def _is_envelope(message: Inbound) -> bool:
    if message.content_type is not None:
        return message.content_type.split(";")[0].strip().lower() == JSON
    return message.payload.lstrip()[:1] == b"{"


def parse(message: Inbound, max_payload: int) -> tuple[bytes, str | None, dict[str, Any] | None]:
    """(image bytes, job id or None, meta or None); ``Rejected`` with a code for what is not usable."""
    if len(message.payload) > max_payload:
        raise Rejected(f"message of {len(message.payload)} bytes is over mqtt.max_payload ({max_payload} bytes)",
                       "payload_too_large")
    if not message.payload:
        raise Rejected("the message is empty", "image_empty")
    job_id, meta = None, None
    if _is_envelope(message):
        try:
            envelope = json.loads(message.payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Rejected(f"not valid JSON: {exc}", "bad_envelope") from None
        if not isinstance(envelope, dict) or not isinstance(envelope.get("image"), str):
            raise Rejected('a JSON message must be an object with "image": base64 of the image', "bad_envelope")
        unknown = sorted(set(envelope) - ENVELOPE_KEYS)
        if unknown:
            raise Rejected(f"unknown keys in the envelope: {', '.join(unknown)} (known: id, image, meta)",
                           "bad_envelope")
        if "id" in envelope:
            if not isinstance(envelope["id"], str) or not SAFE_ID.match(envelope["id"]):
                raise Rejected("id must be 1 to 128 letters, digits, '_', '.' or '-', starting with a letter or digit",
                               "bad_id")
            job_id = envelope["id"]
        if "meta" in envelope:
            meta = envelope["meta"]
            if not isinstance(meta, dict) or len(json.dumps(meta)) > MAX_META:
                raise Rejected(f"meta must be a JSON object of at most {MAX_META} bytes", "bad_envelope")
        try:
            image = base64.b64decode(envelope["image"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Rejected(f"image is not valid base64: {exc}", "bad_envelope") from None
        if not image:
            raise Rejected("the image is empty", "image_empty")
    else:
        image = message.payload
    return image, job_id or _correlation_id(message.correlation), meta


class MqttIntake:
    def __init__(self, spool: Spool, seen: SeenIds, outbox: Outbox, topics: Topics, device_id: str, qos: int,
                 max_payload: int, rules: tuple[Rule, ...], on_job: Callable[[], None]) -> None:
        # Error records of rejected messages, for the daemon's counters and recent results (its loop takes them).
        self.rejected: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.spool = spool
        self.seen = seen
        self.outbox = outbox
        self.topics = topics
        self.device_id = device_id
        self.qos = qos
        self.max_payload = max_payload
        self.rules = rules
        self.on_job = on_job
        self._lock = threading.Lock()

    def set_rules(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules

    def filters(self) -> list[str]:
        return sorted({t for r in self.rules for t in r.topics})

    def rule_for(self, topic: str) -> Rule | None:
        # The first rule in the file whose filter matches, as for overlapping folders.
        return next((r for r in self.rules for f in r.topics if topic_matches_sub(f, topic)), None)

    def take(self, message: Inbound) -> Outcome:
        """Spool the message's image or publish why not; ``OSError`` when it could not be stored (no ack)."""
        rule = self.rule_for(message.topic)
        extra = {"EDGEVL_TOPIC": message.topic}
        if rule is None:
            log.warning("message on %s matches no rule (any more); dropped", message.topic, extra=extra)
            return "ignored"
        source: dict[str, Any] = {"kind": "mqtt", "topic": message.topic}
        reply = None
        if message.response_topic:
            reply = {"topic": message.response_topic,
                     "correlation": base64.b64encode(message.correlation).decode() if message.correlation else None}
        received_at = now_rfc3339()
        with self._lock:
            try:
                image, job_id, meta = parse(message, self.max_payload)
                suffix = accepted_suffix(image)
            except (Rejected, ImageError) as exc:
                job = Job(rule=rule.name, source=source, device_id=self.device_id, job_id=new_job_id(),
                          received_at=received_at)
                record = job.error(exc.code, exc.message)
                self.outbox.put(record_messages(self.topics, record, self.qos, reply))
                self.rejected.put(record)
                log.warning("rejected a message on %s: %s: %s", message.topic, exc.code, exc.message,
                            extra={**extra, "EDGEVL_JOB": job.job_id, "EDGEVL_RULE": rule.name})
                self.on_job()
                return "rejected"
            if job_id is not None and job_id in self.seen:
                log.info("message %s on %s was taken before; not answered again", job_id, message.topic,
                         extra={**extra, "EDGEVL_JOB": job_id})
                return "duplicate"
            if meta is not None:
                source["meta"] = meta
            taken = self.spool.accept(image, suffix, rule.name, source, received_at, job_id, reply)
            if job_id is not None:
                self.seen.add(job_id)
        log.info("took a message on %s as job %s", message.topic, taken.job_id,
                 extra={**extra, "EDGEVL_JOB": taken.job_id, "EDGEVL_RULE": rule.name})
        self.on_job()
        return "accepted"
