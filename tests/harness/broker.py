"""A real Mosquitto of the test's own on a free loopback port, and a subscriber that records what it hears."""

from __future__ import annotations

import getpass
import json
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def free_port() -> int:
    """A free port below the kernel's ephemeral range.

    A client reconnecting to a stopped broker on an ephemeral port can be given
    that very port as its own and connect to itself, which then blocks the
    broker's restart; ports outside the range are never handed out that way.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


class Broker:
    """``mosquitto`` on 127.0.0.1:<free port>; persistent, so that sessions survive a restart."""

    def __init__(self, root: Path, extra: str = "", users: dict[str, str] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = root / "mosquitto.log"
        # user: mosquitto started by root would otherwise switch to its own user, which cannot write here.
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", "persistence true",
                 f"persistence_location {root}/",
                 f"log_dest file {self.log_path}", "log_type all", "connection_messages true"]
        if users:
            passwd = root / "passwd"
            passwd.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = root / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n" + extra + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"mosquitto exited: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Heard:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None
    content_type: str | None

    def json(self) -> Any:
        return json.loads(self.payload)


class Listener:
    """A paho client subscribed to ``filters`` that keeps every message; a persistent session when ``session``."""

    def __init__(self, port: int, filters: list[str], client_id: str = "", session: bool = False,
                 protocol: str = "5", tls: dict[str, Any] | None = None, auth: tuple[str, str] | None = None) -> None:
        self.heard: list[Heard] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        v5 = protocol == "5"
        client_id = client_id or f"listener-{random.getrandbits(32):08x}"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
                                  clean_session=None if v5 else not session)
        if tls:
            self.client.tls_set(**tls)
        if auth:
            self.client.username_pw_set(*auth)
        self.filters = filters
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600 if session else 0
        self.client.reconnect_delay_set(0, 1)
        kwargs: dict[str, Any] = {"clean_start": not session, "properties": properties} if v5 else {}
        self.client.connect_async("127.0.0.1", port, 10, **kwargs)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the listener could not subscribe"

    def _on_connect(self, client: paho.Client, *args: Any) -> None:
        client.subscribe([(f, 1) for f in self.filters])

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        props = message.properties
        with self.lock:
            self.heard.append(Heard(message.topic, bytes(message.payload), bool(message.retain),
                                    getattr(props, "CorrelationData", None), getattr(props, "ContentType", None)))

    def messages(self, match: Callable[[Heard], bool] = lambda h: True) -> list[Heard]:
        with self.lock:
            return [h for h in self.heard if match(h)]

    def wait(self, match: Callable[[Heard], bool], count: int = 1, timeout: float = 60,
             why: Callable[[], str] = lambda: "") -> list[Heard]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.messages(match)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{len(self.messages(match))} of {count} messages after {timeout} s; "
                             f"heard topics {sorted({h.topic for h in self.messages()})}\n{why()}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(port: int, topic: str, payload: bytes, protocol: str = "5", properties: Properties | None = None,
            qos: int = 1, retain: bool = False, **client_args: Any) -> None:
    """Publish one message and wait for the broker's acknowledgement."""
    v5 = protocol == "5"
    client = paho.Client(CallbackAPIVersion.VERSION2,
                         protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311)
    if "tls" in client_args:
        client.tls_set(**client_args["tls"])
    if "auth" in client_args:
        client.username_pw_set(*client_args["auth"])
    client.connect("127.0.0.1", port, 10)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos, properties=properties, retain=retain)
        info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


class Publisher:
    """One connection for many publications."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port, 10)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes, properties: Properties | None = None) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1, properties=properties)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def request_properties(response_topic: str | None = None, correlation: bytes | None = None,
                       content_type: str | None = None) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if response_topic:
        props.ResponseTopic = response_topic
    if correlation:
        props.CorrelationData = correlation
    if content_type:
        props.ContentType = content_type
    return props
