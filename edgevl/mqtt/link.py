"""The one seam between edgevl and paho-mqtt: connection, session, last will, callbacks.

paho's network thread runs the callbacks; they only hand data over (input
messages to the intake, acknowledgements to a list) and wake the daemon's loop.
A persistent session (MQTT v5 session expiry, or a 3.1.1 session that is not
clean) makes the broker keep the input subscriptions and queue frames while the
appliance restarts.  Input messages are acknowledged by hand, after the intake
has stored them.  paho reconnects with exponential backoff; refusals and TLS
failures are logged with their reason once per change, not once per attempt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgevl.config import MqttSettings, read_secret
from edgevl.errors import ConfigError
from edgevl.mqtt.intake import Inbound, Outcome
from edgevl.mqtt.messages import OutMessage

log = logging.getLogger(__name__)

RECONNECT_MIN = 1.0


def read_password(settings: MqttSettings) -> str | None:
    """The broker password: ``password_file``, else the systemd credential ``mqtt-password``."""
    path = settings.password_file
    if path is None and os.environ.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(os.environ["CREDENTIALS_DIRECTORY"]) / "mqtt-password"
        path = candidate if candidate.exists() else None
    if path is None:
        return None
    return read_secret(path, "mqtt.password_file").rstrip("\r\n")


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """The TLS context; an error names the key and the file at fault (ssl's own errors name neither)."""
    if (settings.cert_file is None) != (settings.key_file is None):
        raise ConfigError("mqtt: cert_file and key_file go together (the client certificate and its key)")
    for key in ("ca_file", "cert_file", "key_file"):
        path: Path | None = getattr(settings, key)
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"mqtt.{key} {path}: {exc.strerror or exc}") from None
    key = "ca_file"
    try:
        context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
        if settings.cert_file is not None and settings.key_file is not None:
            key = "cert_file/key_file"
            context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    except ssl.SSLError as exc:
        raise ConfigError(f"mqtt.{key}: not a usable certificate or key ({exc.reason or exc})") from None
    except OSError as exc:
        raise ConfigError(f"mqtt.{key}: {exc.strerror or exc}") from None
    return context


class MqttLink:
    def __init__(self, settings: MqttSettings, client_id: str, will: tuple[str, str],
                 on_message: Callable[[Inbound], Outcome], on_connected: Callable[[], None],
                 wake: threading.Event) -> None:
        self.settings = settings
        self.client_id = client_id
        self.will = will
        self.on_message = on_message
        self.on_connected = on_connected
        self.wake = wake
        self.password = read_password(settings)
        self.context = tls_context(settings) if settings.tls else None
        self.filters: list[str] = []
        self.connected = False
        self.generation = 0  # one per client object: message ids of an older one mean nothing
        self.unacked_since: float | None = None  # input that could not be stored, left unacknowledged
        self._acked: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._last_problem = ""
        self._client: paho.Client | None = None

    @property
    def v5(self) -> bool:
        return self.settings.protocol == "5"

    def start(self) -> None:
        s = self.settings
        self.generation += 1
        generation = self.generation
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.v5 else s.session_expiry == 0, manual_ack=True,
        )
        if s.username:
            client.username_pw_set(s.username, self.password)
        if self.context is not None:
            client.tls_set_context(self.context)
        topic, payload = self.will
        client.will_set(topic, payload, qos=1, retain=True)
        client.reconnect_delay_set(int(RECONNECT_MIN), int(s.reconnect_max))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = lambda _c, _u, mid, reason, _p: self._on_publish(generation, mid, reason)
        properties = None
        if self.v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = s.session_expiry
        client.connect_async(s.host, s.port, s.keepalive, clean_start=s.session_expiry == 0, properties=properties)
        client.loop_start()
        self._client = client

    def stop(self, last: OutMessage | None = None, timeout: float = 3.0) -> None:
        """Publish ``last`` (the offline status) if connected, disconnect cleanly, stop paho's thread."""
        client, self._client = self._client, None
        if client is None:
            return
        if last is not None and self.connected:
            info = client.publish(last.topic, last.payload, qos=last.qos, retain=last.retain)
            with contextlib.suppress(RuntimeError, ValueError):  # not sent in time: the will says offline
                info.wait_for_publish(timeout)
        self.connected = False
        client.disconnect()
        client.loop_stop()

    def restart(self) -> None:
        """A new connection: the broker redelivers the input left unacknowledged on the old one."""
        log.info("reconnecting to %s:%d to have unacknowledged input delivered again", self.settings.host,
                 self.settings.port)
        self.stop()
        self.unacked_since = None
        self.start()

    def set_filters(self, filters: list[str]) -> None:
        old, self.filters = self.filters, filters
        client = self._client
        if client is None or not self.connected:
            return  # subscribed on (re)connect
        gone = [f for f in old if f not in filters]
        if gone:
            client.unsubscribe(gone)
        if filters:
            client.subscribe(self._subscriptions(filters))

    def _subscriptions(self, filters: list[str]) -> list[tuple[str, Any]]:
        if self.v5:
            # Retained frames are not answered (see intake): with v5 the broker is asked not to send them.
            options = SubscribeOptions(qos=int(self.settings.qos), retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            return [(f, options) for f in filters]
        return [(f, int(self.settings.qos)) for f in filters]

    def publish(self, message: OutMessage) -> int | None:
        """Hand ``message`` to paho; its id, or None when paho refused it. Queued by paho while offline."""
        client = self._client
        if client is None:
            return None
        properties = None
        if self.v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.ContentType = message.content_type
            if message.correlation_bytes is not None:
                properties.CorrelationData = message.correlation_bytes
        info = client.publish(message.topic, message.payload_bytes, qos=message.qos, retain=message.retain,
                              properties=properties)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.error("cannot publish to %s: %s", message.topic, paho.error_string(info.rc))
            return None
        return info.mid

    def take_acked(self) -> list[tuple[int, int]]:
        """(generation, message id) of the publications the broker has acknowledged since the last call."""
        with self._lock:
            acked, self._acked = self._acked, []
        return acked

    # paho's thread from here on: hand over, log, never raise.
    def _problem(self, text: str) -> None:
        if text != self._last_problem:
            log.error("%s", text)
            self._last_problem = text

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            hint = ""
            if reason.value in (0x86, 0x87, 4, 5):
                hint = "; check mqtt.username and the password"
            self._problem(f"the broker {self.settings.host}:{self.settings.port} refused the connection: "
                          f"{reason.getName()}{hint}; retrying at most every {self.settings.reconnect_max:.0f} s")
            return
        self._last_problem = ""
        self.connected = True
        log.info("connected to the broker %s:%d (%s session)", self.settings.host, self.settings.port,
                 "resumed" if getattr(flags, "session_present", False) else "new")
        try:
            if self.filters:
                client.subscribe(self._subscriptions(self.filters))
            self.on_connected()
        except Exception:
            log.exception("after connecting")
        self.wake.set()

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this while handling the exception, which says why.
        exc = sys.exc_info()[1]
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown reason"
        if isinstance(exc, ssl.SSLError):
            reason = f"TLS failed: {exc}"
        self._problem(f"cannot connect to the broker {self.settings.host}:{self.settings.port}: {reason}; "
                      f"retrying at most every {self.settings.reconnect_max:.0f} s")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        if self.connected:
            log.warning("lost the broker %s:%d: %s; results wait in the outbox", self.settings.host,
                        self.settings.port, reason.getName())
        self.connected = False
        self.wake.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            props = message.properties
            inbound = Inbound(
                topic=message.topic, payload=bytes(message.payload),
                content_type=getattr(props, "ContentType", None),
                correlation=getattr(props, "CorrelationData", None),
                response_topic=getattr(props, "ResponseTopic", None),
                retained=bool(message.retain),
            )
            # Stored, or answered with an error record, unless it could not be kept: only then is it left
            # unacknowledged, for the broker to send again.
            ack = self.on_message(inbound) != "unstored"
        except Exception:
            # Never raised by the intake; a message that cannot even be read is dropped, not redelivered for ever.
            log.exception("taking a message with id %d", message.mid)
            ack = True
        if ack:
            if message.qos > 0:
                client.ack(message.mid, message.qos)
        elif self.unacked_since is None:
            self.unacked_since = time.monotonic()
        self.wake.set()

    def _on_publish(self, generation: int, mid: int, reason: ReasonCode) -> None:
        if reason.is_failure:
            log.warning("the broker did not take message %d: %s", mid, reason.getName())
        with self._lock:
            self._acked.append((generation, mid))
        self.wake.set()
