"""MQTT in the daemon: input intake, the durable outbox and its publisher, status, discovery.

The daemon's loop calls ``tick``; everything here that touches the outbox's
publication state runs on that loop, and paho's thread only stores input and
reports acknowledgements.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from edgevl.config import Config
from edgevl.mqtt.discovery import discovery_messages, legacy_topics
from edgevl.mqtt.intake import MqttIntake
from edgevl.mqtt.link import MqttLink
from edgevl.mqtt.messages import OutMessage, Topics, record_messages, status_payload
from edgevl.mqtt.outbox import Outbox
from edgevl.mqtt.seen import SeenIds
from edgevl.records import ErrorRecord, Record, now_rfc3339
from edgevl.rules import Rule
from edgevl.spool.hand import Hand
from edgevl.spool.job import SpoolJob
from edgevl.spool.store import Spool

log = logging.getLogger(__name__)

WINDOW = 16  # outbox entries in flight at once; paho's own in-flight limit is 20 messages


class MqttService:
    def __init__(self, config: Config, rules: tuple[Rule, ...], spool: Spool, hand: Hand, wake: threading.Event,
                 counts: Callable[[], dict[str, Any]]) -> None:
        s = config.mqtt
        self.config = config
        self.settings = s
        self.counts = counts
        self.since = now_rfc3339()
        self.topics = Topics(s.topic_prefix, config.device_id)
        state = config.state_dir / "mqtt"
        self.outbox = Outbox(state / "outbox")
        self.seen = SeenIds(state / "seen-ids")
        for job in spool.readable():  # taken before a crash that came before its id was noted
            if job.meta["source"].get("kind") == "mqtt":
                self.seen.add(job.job_id)
        self.intake = MqttIntake(spool, self.seen, self.outbox, self.topics, config.device_id, s.qos,
                                 int(s.max_payload), rules, hand, wake.set)
        client_id = s.client_id or f"edgevl-{config.device_id}"
        will = (self.topics.status, self._status("offline"))
        # A message intake.take could not store ("unstored") is not acknowledged.
        self.link = MqttLink(s, client_id, will, self.intake.take, self._connected, wake)
        self.link.filters = self._filters()
        self.state = "online"
        self._inflight: dict[str, set[int]] = {}  # outbox entry -> its unacknowledged message ids
        self._entry_of: dict[int, str] = {}
        self._generation = 0
        self._next_status = 0.0
        self._discovered: set[str] = set()
        for rule in rules:
            if rule.topics:
                log.info("rule %s takes images from MQTT %s", rule.name, ", ".join(rule.topics))

    def __enter__(self) -> MqttService:
        log.info("MQTT: %s:%d, protocol %s, base topic %s, %d results waiting in the outbox", self.settings.host,
                 self.settings.port, self.settings.protocol, self.topics.base, len(self.outbox))
        self.link.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Whatever the broker takes within a moment leaves the outbox now; the rest waits for the next start.
        deadline = time.monotonic() + 3.0
        while len(self.outbox) and self.link.connected and time.monotonic() < deadline:
            self._pump()
            time.sleep(0.05)
        self._pump()
        self.link.stop(OutMessage(self.topics.status, self._status("offline"), 1, retain=True))

    def _filters(self) -> list[str]:
        group = self.settings.share_group
        return [f"$share/{group}/{f}" if group else f for f in self.intake.filters()]

    def _status(self, state: str) -> str:
        fields: dict[str, Any] = {"device_id": self.config.device_id,
                                  "model": {"id": self.config.model.id, "precision": self.config.model.precision}}
        if state != "offline":
            fields.update(since=self.since, **self.counts())
        return status_payload(state, **fields)

    # paho's thread
    def _connected(self) -> None:
        self.link.publish(OutMessage(self.topics.status, self._status(self.state), 1, retain=True))
        if self.settings.ha_discovery:
            self._publish_discovery()

    def _publish_discovery(self) -> None:
        configs = discovery_messages(self.topics, self.settings.ha_prefix, self.config.device_id,
                                     self.config.model.id, self.intake.rules, self.config.http.page_url())
        gone = self._discovered | legacy_topics(self.settings.ha_prefix, self.config.device_id, self.intake.rules)
        for topic in sorted(gone - set(configs)):  # questions that left the rules, configs of the old scheme
            self.link.publish(OutMessage(topic, "", 1, retain=True))
        for topic, payload in configs.items():
            self.link.publish(OutMessage(topic, payload, 1, retain=True))
        self._discovered = set(configs)

    # the daemon's loop
    def deliver(self, job: SpoolJob, record: Record, alarm_jpeg: bytes | None = None) -> None:
        """Keep the record's messages in the outbox (``OSError`` when that fails); called before the spool forgets
        the job, and idempotent, so a job replayed after a crash is published once."""
        self.outbox.put(record_messages(self.topics, record, self.settings.qos, job.meta.get("reply"), alarm_jpeg),
                        key=job.key)

    def set_rules(self, rules: tuple[Rule, ...]) -> None:
        self.intake.set_rules(rules)
        self.link.set_filters(self._filters())
        if self.settings.ha_discovery and self.link.connected:
            self._publish_discovery()

    def stopping(self) -> None:
        self.state = "stopping"
        self.link.publish(OutMessage(self.topics.status, self._status("stopping"), 1, retain=True))

    def tick(self, now: float) -> list[ErrorRecord]:
        """Publish what waits, refresh the status; the error records of input rejected since the last tick."""
        self._pump()
        if now >= self._next_status and self.link.connected:
            self.link.publish(OutMessage(self.topics.status, self._status(self.state), 1, retain=True))
            self._next_status = now + self.settings.status_interval
        # Input that could not be stored (a full disk) stays with the broker, which
        # sends it again on a new connection; one is made as often as reconnects are.
        unacked = self.link.unacked_since
        if unacked is not None and now - unacked >= self.settings.reconnect_max and self.state == "online":
            self.link.restart()
        rejected = []
        while not self.intake.rejected.empty():
            rejected.append(self.intake.rejected.get())
        return rejected

    def _pump(self) -> None:
        if self.link.generation != self._generation:
            # A new client: what the old one had in flight is published again.
            self._inflight.clear()
            self._entry_of.clear()
            self._generation = self.link.generation
        for generation, mid in self.link.take_acked():
            name = self._entry_of.pop(mid, None) if generation == self._generation else None
            if name is None or name not in self._inflight:
                continue
            self._inflight[name].discard(mid)
            if not self._inflight[name]:
                del self._inflight[name]
                try:
                    self.outbox.remove(name)
                except OSError as exc:
                    log.error("cannot remove %s from the outbox: %s", name, exc.strerror or exc)
        if not self.link.connected:
            return
        for name in self.outbox.names():
            if len(self._inflight) >= WINDOW:
                break
            if name in self._inflight:
                continue
            messages = self.outbox.load(name)
            if messages is None:
                continue
            mids: set[int] = set()
            for message in messages:
                sent = self.link.publish(message)
                if sent is None:
                    break
                mids.add(sent)
            else:
                if mids:
                    self._inflight[name] = mids
                    self._entry_of.update(dict.fromkeys(mids, name))
                else:
                    self.outbox.remove(name)
                continue
            return  # paho refused a message: the whole entry is tried again on the next tick

    def status_text(self) -> str:
        return f"mqtt {'connected' if self.link.connected else 'disconnected'}, outbox {len(self.outbox)}"
