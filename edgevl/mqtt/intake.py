"""MQTT input messages → spool jobs, or error records for what is not an image.

A payload is raw image bytes, or a JSON envelope ``{"id", "image": base64,
"meta": {…}}`` (MQTT v5 content type ``application/json``, or a payload that
starts with ``{``).  The job id comes from the envelope, else from the v5
correlation data, else is generated; it names files, so it is checked, and
nothing from ``meta`` is ever used as a path.

``take`` runs on the MQTT thread and returns only once the image is durable in
the spool; the message is acknowledged after that, so the broker redelivers
whatever a crash or a full disk kept from the spool. Every other outcome (an
error record for a bad message, even for one that broke edgevl's own code) is
acknowledged: a message the broker would redeliver for ever would block the
input. JSON is checked for size and nesting before it is parsed, and ``meta``
travels as JSON text, never as nested objects.

A retained image message is ignored: the broker replays it at every
subscription, and answering it again at every start or reconnect is never what
its sender meant. A frame published with the retain flag to a subscribed edgevl
arrives without the flag and is answered like any other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from paho.mqtt.client import topic_matches_sub

from edgevl.errors import EdgevlError, ImageError
from edgevl.images import accepted_suffix
from edgevl.jsonshape import ShapeError, check_shape
from edgevl.mqtt.messages import JSON, Topics, record_messages
from edgevl.mqtt.outbox import Outbox
from edgevl.mqtt.seen import SeenIds
from edgevl.records import ErrorRecord, Job, Source, new_job_id, now_rfc3339
from edgevl.rules import Rule
from edgevl.spool.hand import Hand
from edgevl.spool.job import Reply
from edgevl.spool.store import Spool

log = logging.getLogger(__name__)

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_META = 16 << 10
MAX_DEPTH = 16  # the envelope and its meta together
MAX_ITEMS = 4096
ENVELOPE_KEYS = {"id", "image", "meta"}

# unstored: it could not be kept (a full disk): not acknowledged, so the broker sends it again.
Outcome = Literal["accepted", "duplicate", "rejected", "ignored", "unstored"]


@dataclass(frozen=True)
class Inbound:
    """An input message as the MQTT thread received it."""

    topic: str
    payload: bytes
    content_type: str | None = None
    correlation: bytes | None = None
    response_topic: str | None = None
    retained: bool = False  # replayed by the broker from its retained store


class Rejected(EdgevlError):
    code = "bad_message"

    def __init__(self, message: str, code: str | None = None, sender_id: str | None = None) -> None:
        super().__init__(message, code)
        self.sender_id = sender_id  # the sender's id, when it could be read: its error record carries it


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


def parse(message: Inbound, max_payload: int) -> tuple[bytes, str | None, str | None]:
    """(image bytes, job id or None, meta as JSON text or None); ``Rejected`` with a code for what is not
    usable, carrying the sender's id whenever it could be read."""
    sender = _correlation_id(message.correlation)
    if len(message.payload) > max_payload:
        raise Rejected(f"message of {len(message.payload)} bytes is over mqtt.max_payload ({max_payload} bytes)",
                       "payload_too_large", sender)
    if not message.payload:
        raise Rejected("the message is empty", "image_empty", sender)
    if not _is_envelope(message):
        return message.payload, sender, None
    try:
        check_shape(message.payload, MAX_DEPTH, MAX_ITEMS)
        envelope = json.loads(message.payload)
    except ShapeError as exc:
        raise Rejected(f"{exc} (meta is a small object)", "bad_envelope", sender) from None
    except ValueError as exc:  # UnicodeDecodeError too; nesting was bounded above
        raise Rejected(f"not valid JSON: {exc}", "bad_envelope", sender) from None
    if not isinstance(envelope, dict):
        raise Rejected('a JSON message must be an object with "image": base64 of the image', "bad_envelope", sender)
    if "id" in envelope:
        if not isinstance(envelope["id"], str) or not SAFE_ID.match(envelope["id"]):
            raise Rejected("id must be 1 to 128 letters, digits, '_', '.' or '-', starting with a letter or digit",
                           "bad_id", sender)
        sender = envelope["id"]
    if not isinstance(envelope.get("image"), str):
        raise Rejected('a JSON message must be an object with "image": base64 of the image', "bad_envelope", sender)
    unknown = sorted(set(envelope) - ENVELOPE_KEYS)
    if unknown:
        raise Rejected(f"unknown keys in the envelope: {', '.join(unknown)} (known: id, image, meta)",
                       "bad_envelope", sender)
    meta = None
    if "meta" in envelope:
        if not isinstance(envelope["meta"], dict):
            raise Rejected(f"meta must be a JSON object of at most {MAX_META} bytes", "bad_envelope", sender)
        meta = json.dumps(envelope["meta"], ensure_ascii=False, separators=(",", ":"))
        if len(meta.encode("utf-8", "surrogatepass")) > MAX_META:
            raise Rejected(f"meta must be a JSON object of at most {MAX_META} bytes", "bad_envelope", sender)
    try:
        image = base64.b64decode(envelope["image"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Rejected(f"image is not valid base64: {exc}", "bad_envelope", sender) from None
    if not image:
        raise Rejected("the image is empty", "image_empty", sender)
    return image, sender, meta


class MqttIntake:
    def __init__(self, spool: Spool, seen: SeenIds, outbox: Outbox, topics: Topics, device_id: str, qos: int,
                 max_payload: int, rules: tuple[Rule, ...], hand: Hand, on_job: Callable[[], None]) -> None:
        # Error records of rejected messages, for the daemon's counters and recent results (its loop takes them).
        self.rejected: queue.SimpleQueue[ErrorRecord] = queue.SimpleQueue()
        self.spool = spool
        self.seen = seen
        self.outbox = outbox
        self.topics = topics
        self.device_id = device_id
        self.qos = qos
        self.max_payload = max_payload
        self.rules = rules
        self.hand = hand
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
        """Spool the message's image, or publish why not; whatever happens, one outcome."""
        extra = {"EDGEVL_TOPIC": message.topic}
        if message.retained:
            log.info("ignoring the retained message on %s: retained frames are not answered again at every "
                     "subscription", message.topic, extra=extra)
            return "ignored"
        rule = self.rule_for(message.topic)
        if rule is None:
            log.warning("message on %s matches no rule (any more); dropped", message.topic, extra=extra)
            return "ignored"
        key = "mqtt:" + hashlib.sha256(message.payload).hexdigest()
        with self.hand.holding(key):
            try:
                if self.hand.take_poison(key):
                    return self._reject(message, rule, Rejected(
                        "edgevl stopped twice in a row while it handled this message; it is not taken again",
                        "quarantined"))
                return self._take(message, rule)
            except OSError as exc:
                log.error("cannot store a message from %s: %s; not acknowledged, so the broker keeps it",
                          message.topic, exc.strerror or exc, extra=extra)
                return "unstored"
            except Exception as exc:  # a bug must cost this message an error record, never the input
                if not isinstance(exc, EdgevlError):
                    log.exception("taking a message from %s", message.topic, extra=extra)
                    exc = Rejected(f"edgevl could not take this message: {type(exc).__name__}", "internal_error")
                try:
                    return self._reject(message, rule, exc)
                except OSError:
                    return "unstored"

    def _reject(self, message: Inbound, rule: Rule, exc: EdgevlError, sender_id: str | None = None) -> Outcome:
        """An error record for a message that is no image; it carries the sender's id when one was read."""
        source = Source(kind="mqtt", topic=message.topic)
        job = Job(rule=rule.name, source=source, device_id=self.device_id, job_id=sender_id or new_job_id())
        record = job.error(exc.code, exc.message)
        self.outbox.put(record_messages(self.topics, record, self.qos, self._reply(message)))
        self.rejected.put(record)
        log.warning("rejected a message on %s: %s: %s", message.topic, exc.code, exc.message,
                    extra={"EDGEVL_TOPIC": message.topic, "EDGEVL_JOB": job.job_id, "EDGEVL_RULE": rule.name})
        self.on_job()
        return "rejected"

    @staticmethod
    def _reply(message: Inbound) -> Reply | None:
        if not message.response_topic:
            return None
        return Reply(topic=message.response_topic,
                     correlation=base64.b64encode(message.correlation).decode() if message.correlation else None)

    def _take(self, message: Inbound, rule: Rule) -> Outcome:
        extra = {"EDGEVL_TOPIC": message.topic}
        source = Source(kind="mqtt", topic=message.topic)
        received_at = now_rfc3339()
        with self._lock:
            try:
                image, job_id, meta = parse(message, self.max_payload)
            except Rejected as exc:
                return self._reject(message, rule, exc, exc.sender_id)
            try:
                suffix = accepted_suffix(image)
            except ImageError as exc:
                return self._reject(message, rule, exc, job_id)
            if job_id is not None and job_id in self.seen:
                log.info("message %s on %s was taken before; not answered again", job_id, message.topic,
                         extra={**extra, "EDGEVL_JOB": job_id})
                return "duplicate"
            taken = self.spool.accept(image, suffix, rule.name, source, received_at, job_id, self._reply(message),
                                      meta)
            if job_id is not None:
                self.seen.add(job_id)
        log.info("took a message on %s as job %s", message.topic, taken.job_id,
                 extra={**extra, "EDGEVL_JOB": taken.job_id, "EDGEVL_RULE": rule.name})
        self.on_job()
        return "accepted"
