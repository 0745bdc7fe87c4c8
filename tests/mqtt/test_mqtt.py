"""MQTT end to end: a real ``edgevl run`` with the test model against a real Mosquitto of the test's own."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.harness.broker import Broker, Heard, Listener, Publisher, publish, request_properties
from tests.harness.daemon import RULES, DaemonProcess
from tests.harness.disks import fill
from tests.harness.images import encode, noise_image

pytestmark = pytest.mark.slow

TOPIC = "factory/line1/cam/frame"
RULES_MQTT = RULES.replace('patterns = ["*.jpg", "*.png"]',
                           'patterns = ["*.jpg", "*.png"]\ntopics = ["factory/+/cam/frame"]')
BASE = "edgevl/test-station"


def _jpeg(seed: int) -> bytes:
    return encode(noise_image(160, 120, seed=seed), "JPEG")


def _envelope(image: bytes, **fields: Any) -> bytes:
    return json.dumps({"image": base64.b64encode(image).decode(), **fields}).encode()


def _mqtt_config(port: int, extra: str = "") -> str:
    return f"""
[mqtt]
host = "127.0.0.1"
port = {port}
status_interval = 1
reconnect_max = 2
{extra}
"""


def _is(topic: str) -> Any:
    return lambda h: h.topic == topic


def _status(h: Heard, state: str) -> bool:
    return h.topic == f"{BASE}/status" and h.json()["state"] == state


def test_images_in_results_answers_replies_and_status_out(tmp_path: Path, test_model_dir: Path,
                                                          broker: Broker) -> None:
    listener = Listener(broker.port, ["edgevl/#", "replies/#", "homeassistant/#"])
    d = DaemonProcess(tmp_path, test_model_dir, rules=RULES_MQTT,
                      config_extra=_mqtt_config(broker.port, "ha_discovery = true"))
    d.start()
    try:
        d.wait_notify("READY=1")
        listener.wait(lambda h: _status(h, "online"), why=d.log)
        # A raw frame, an envelope whose id and meta must not become paths, a v5 request, a file.
        publish(broker.port, TOPIC, _jpeg(1))
        meta = {"station": "s3", "name": "../../../etc/passwd", "path": "/etc/passwd"}
        publish(broker.port, "factory/line2/cam/frame", _envelope(_jpeg(2), id="frame-0001", meta=meta),
                properties=request_properties(content_type="application/json"))
        publish(broker.port, TOPIC, _jpeg(3),
                properties=request_properties(response_topic="replies/s3", correlation=b"\x01\x02req"))
        (d.inbox / "part.jpg").write_bytes(_jpeg(4))
        results = listener.wait(_is(f"{BASE}/results/cam"), 4, why=d.log)
        records = [h.json() for h in results]
        assert Counter(r["source"]["kind"] for r in records) == {"mqtt": 3, "folder": 1}
        assert all(r["schema"] == "edgevl.result/2" for r in records)
        assert all(h.content_type == "application/json" for h in results)
        envelope = next(r for r in records if r["job_id"] == "frame-0001")
        assert envelope["source"] == {"kind": "mqtt", "topic": "factory/line2/cam/frame", "meta": meta}
        assert (d.results / "cam" / "frame-0001.json").is_file()
        assert all(p.parent == d.results / "cam" for p in d.results.rglob("*") if p.is_file())

        reply = listener.wait(_is("replies/s3"), why=d.log)[0]
        assert reply.correlation == b"\x01\x02req"
        assert reply.json()["schema"] == "edgevl.result/2"
        assert reply.json()["source"]["topic"] == TOPIC

        # Retained answers: a dashboard that subscribes later still gets the latest ones.
        late = Listener(broker.port, [f"{BASE}/answers/#"])
        answers = late.wait(lambda h: h.retain, 2, timeout=10)
        late.close()
        by_question = {h.topic.rsplit("/", 1)[1]: h.json() for h in answers}
        assert set(by_question) == {"defect", "label"}
        assert isinstance(by_question["defect"]["value"], bool)
        assert 0.0 <= by_question["defect"]["p_yes"] <= 1.0
        assert by_question["defect"]["job_id"] in {r["job_id"] for r in records}
        assert {"value", "confidence", "alarm", "job_id", "ts"} <= set(by_question["label"])

        published = listener.messages(lambda h: h.topic.startswith("homeassistant/"))
        discovery = {h.topic: h.json() for h in published if h.payload}
        # The configs of the first scheme (dashes as underscores) are cleared, so no entity is there twice.
        assert "homeassistant/binary_sensor/edgevl_test_station/cam_defect/config" in {
            h.topic for h in published if not h.payload}
        binary = discovery["homeassistant/binary_sensor/edgevl_test-station/cam_defect/config"]
        assert binary["state_topic"] == f"{BASE}/answers/cam/defect"
        assert binary["availability"][0]["topic"] == f"{BASE}/status"
        assert binary["device_class"] == "problem", "the rule's defect question has alarm_above"
        assert discovery["homeassistant/sensor/edgevl_test-station/cam_label/config"]["value_template"]
        assert "homeassistant/sensor/edgevl_test-station/_queue_depth/config" in discovery

        # The same id again (a sender's retry) is not answered twice; the next id is.
        publish(broker.port, TOPIC, _envelope(_jpeg(2), id="frame-0001"))
        publish(broker.port, TOPIC, _envelope(_jpeg(5), id="frame-0002"))
        listener.wait(lambda h: h.topic == f"{BASE}/results/cam" and h.json()["job_id"] == "frame-0002", why=d.log)
        ids = [h.json()["job_id"] for h in listener.messages(_is(f"{BASE}/results/cam"))]
        assert ids.count("frame-0001") == 1
        assert "taken before; not answered again" in d.log()

        status = listener.wait(lambda h: _status(h, "online") and h.json()["done"] == 5, why=d.log)[-1].json()
        assert status["failed"] == 0
        assert status["model"]["id"] == str(test_model_dir)
        assert status["worker"]["state"] == "ready"
        assert status["worker"]["restarts"] == 0
        assert 0 < status["worker"]["rss"] < status["worker"]["memory_limit"]
    finally:
        code = d.stop()
    assert code == 0
    states = [h.json()["state"] for h in listener.messages(_is(f"{BASE}/status"))]
    assert states[-2:] == ["stopping", "offline"], states
    listener.close()


def test_malformed_messages_get_error_records_and_the_daemon_keeps_answering(
        tmp_path: Path, test_model_dir: Path, broker: Broker) -> None:
    listener = Listener(broker.port, [f"{BASE}/#"])
    d = DaemonProcess(tmp_path, test_model_dir, rules=RULES_MQTT,
                      config_extra=_mqtt_config(broker.port, 'max_payload = "64KiB"'))
    d.start()
    rng = random.Random(7)
    good = base64.b64encode(_jpeg(1)).decode()
    bad: list[tuple[bytes, str]] = [
        (b"{not json", "bad_envelope"),
        (b'{"id": "x1"}', "bad_envelope"),
        (b'{"image": "@@@not base64@@@"}', "bad_envelope"),
        (json.dumps({"id": "../../etc/passwd", "image": good}).encode(), "bad_id"),
        (json.dumps({"id": "/abs", "image": good}).encode(), "bad_id"),
        (json.dumps({"image": good, "path": "/tmp/x"}).encode(), "bad_envelope"),
        (json.dumps({"image": good, "meta": ["a"]}).encode(), "bad_envelope"),
        (b"", "image_empty"),
    ]
    try:
        d.wait_notify("READY=1")
        listener.wait(lambda h: _status(h, "online"), why=d.log)
        pub = Publisher(broker.port)
        sent: Counter[str] = Counter()
        infos = []
        for i in range(1000):
            if i % 10 == 0:
                payload, code = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300))), "unsupported_format"
                if payload[:1] == b"{":
                    payload = b"x" + payload
            else:
                payload, code = bad[i % len(bad)]
            sent[code] += 1
            infos.append(pub.send(TOPIC, payload))
        big = b"\xff\xd8\xff" + bytes(100 << 10)
        infos.append(pub.send(TOPIC, big))
        sent["payload_too_large"] += 1
        # These look like images until decoded, so the model worker's decoder rejects them.
        for not_quite, code in ((_jpeg(9)[:200], "image_unreadable"),
                                (b"GIF89a-but-not-really" + bytes(10), "unsupported_format")):
            infos.append(pub.send(TOPIC, not_quite))
            sent[code] += 1
        for info in infos:
            info.wait_for_publish(30)
        pub.close()

        errors = listener.wait(_is(f"{BASE}/errors"), sum(sent.values()), timeout=180, why=d.log)
        got = Counter(h.json()["error"]["code"] for h in errors)
        assert got == sent
        assert all(h.json()["schema"] == "edgevl.error/1" and h.json()["source"]["topic"] == TOPIC for h in errors)
        assert "x1" in {h.json()["job_id"] for h in errors}, "the sender's id, read from a message without an image"
        assert not (Path("/etc/passwd.json")).exists()

        publish(broker.port, TOPIC, _jpeg(3))
        listener.wait(_is(f"{BASE}/results/cam"), why=d.log)
        # Every rejected message counts as a failed job in the status.
        listener.wait(lambda h: _status(h, "online") and h.json()["failed"] == sum(sent.values())
                      and h.json()["done"] == 1, why=d.log)
        assert d.proc is not None
        assert d.proc.poll() is None
        assert d.log().count("rejected a message on") == sum(sent.values()) - 2
    finally:
        d.kill()  # kill -9: the broker publishes the last will
    late = Listener(broker.port, [f"{BASE}/status"])
    offline = late.wait(lambda h: h.retain and h.json()["state"] == "offline", timeout=30)
    late.close()
    assert offline
    listener.close()


def _answer_while_the_broker_is_away(d: DaemonProcess, broker: Broker, names: list[str]) -> None:
    broker.stop()
    d.wait_notify("mqtt disconnected")
    before = len(d.records())
    for i, name in enumerate(names):
        (d.inbox / name).write_bytes(_jpeg(10 + before + i))
    d.wait_records(before + len(names))
    d.wait_notify(f"outbox {len(names)}")


def test_results_wait_in_the_outbox_through_a_broker_outage_and_a_daemon_restart(
        tmp_path: Path, test_model_dir: Path, broker: Broker) -> None:
    # A persistent session: the broker keeps what is published for the listener while it is away too.
    listener = Listener(broker.port, [f"{BASE}/results/#"], client_id="dashboard", session=True)
    d = DaemonProcess(tmp_path, test_model_dir, rules=RULES_MQTT, config_extra=_mqtt_config(broker.port))
    d.start()
    try:
        d.wait_notify("READY=1")
        d.wait_notify("mqtt connected")

        # The broker goes away mid-run: results are kept on disk and published after it returns.
        _answer_while_the_broker_is_away(d, broker, ["a0.jpg", "a1.jpg", "a2.jpg"])
        broker.start()
        first = listener.wait(_is(f"{BASE}/results/cam"), 3, why=d.log)
        d.wait_notify("mqtt connected, outbox 0")

        # Away again, and the daemon restarts meanwhile: the outbox survives on disk.
        _answer_while_the_broker_is_away(d, broker, ["b0.jpg", "b1.jpg"])
    finally:
        assert d.stop() == 0
    assert len(list((d.state / "mqtt" / "outbox").glob("*.json"))) == 2
    broker.start()
    d.start()
    try:
        d.wait_notify("mqtt connected, outbox 0")
        results = listener.wait(_is(f"{BASE}/results/cam"), 5, why=d.log)
    finally:
        assert d.stop() == 0
    names = {Path(h.json()["source"]["path"]).name for h in results}
    assert names == {"a0.jpg", "a1.jpg", "a2.jpg", "b0.jpg", "b1.jpg"}, "every result arrives"
    # Once from edgevl; the broker itself may repeat a message to a subscriber whose
    # acknowledgement it lost in its own shutdown (QoS 1), so count what the broker received.
    received = re.findall(r"Received PUBLISH from edgevl-test-station \(d\d, q1, r0, m\d+, '([^']+)'", broker.log())
    assert received.count(f"{BASE}/results/cam") == 5, "published once each"
    assert len(first) == 3
    listener.close()


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1, made with openssl."""
    folder.mkdir()
    files = {n: folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "san.cnf")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edgevl test CA",
        "-keyout", str(files["ca.key"]), "-out", str(files["ca.crt"]))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(files["server.key"]), "-out", str(files["server.csr"]))
    files["san.cnf"].write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    run("x509", "-req", "-in", str(files["server.csr"]), "-CA", str(files["ca.crt"]), "-CAkey", str(files["ca.key"]),
        "-CAcreateserial", "-days", "2", "-extfile", str(files["san.cnf"]), "-out", str(files["server.crt"]))
    return files


def test_password_and_tls_over_mqtt_3_1_1(tmp_path: Path, test_model_dir: Path) -> None:
    certs = _certificates(tmp_path / "certs")
    tls_conf = f"cafile {certs['ca.crt']}\ncertfile {certs['server.crt']}\nkeyfile {certs['server.key']}\n"
    broker = Broker(tmp_path / "broker", extra=tls_conf, users={"edgevl": "s3cret", "dash": "board"}).start()
    for name, secret in (("password", "s3cret\n"), ("wrong", "guess\n")):
        (tmp_path / name).write_text(secret)
        (tmp_path / name).chmod(0o600)  # a secret others may read is refused
    tls = {"ca_certs": str(certs["ca.crt"])}
    common = f"""protocol = "3.1.1"
tls = true
ca_file = "{certs['ca.crt']}"
username = "edgevl"
"""
    good = DaemonProcess(tmp_path / "good", test_model_dir, rules=RULES_MQTT, config_extra=_mqtt_config(
        broker.port, common + f'password_file = "{tmp_path / "password"}"'))
    bad = DaemonProcess(tmp_path / "bad", test_model_dir, rules=RULES_MQTT, config_extra=_mqtt_config(
        broker.port, common + f'password_file = "{tmp_path / "wrong"}"'), env={"EDGEVL_DEVICE_ID": "intruder"})
    # Trusts only the system's CAs, which did not sign the broker's certificate.
    untrusting = DaemonProcess(tmp_path / "untrusting", test_model_dir, rules=RULES_MQTT, config_extra=_mqtt_config(
        broker.port, common.replace(f'ca_file = "{certs["ca.crt"]}"\n', "") +
        f'password_file = "{tmp_path / "password"}"'), env={"EDGEVL_DEVICE_ID": "untrusting"})
    listener = Listener(broker.port, [f"{BASE}/results/#"], protocol="3.1.1", tls=tls, auth=("dash", "board"))
    good.start()
    bad.start()
    untrusting.start()
    try:
        good.wait_notify("mqtt connected")
        publish(broker.port, TOPIC, _jpeg(1), protocol="3.1.1", tls=tls, auth=("dash", "board"))
        record = listener.wait(_is(f"{BASE}/results/cam"), why=good.log)[0].json()
        assert record["source"] == {"kind": "mqtt", "topic": TOPIC}

        bad.wait_notify("READY=1")
        deadline = time.monotonic() + 60
        while broker.log().count("not authorised") < 3 and time.monotonic() < deadline:
            bad.read_notify(0.2)
        attempts = broker.log().count("not authorised")
        assert attempts >= 3, "retried"
        assert bad.log().count("refused the connection: Not authorized") + bad.log().count(
            "refused the connection: Bad user name or password") == 1, bad.log()
        assert "check mqtt.username and the password" in bad.log()
        assert any("mqtt disconnected" in m for m in bad.messages)

        untrusting.wait_notify("READY=1")
        deadline = time.monotonic() + 60
        while broker.log().count("OpenSSL Error") < 2 and time.monotonic() < deadline:
            untrusting.read_notify(0.2)
        assert untrusting.log().count("TLS failed") == 1, untrusting.log()
        assert "CERTIFICATE_VERIFY_FAILED" in untrusting.log()
        assert any("mqtt disconnected" in m for m in untrusting.messages)
    finally:
        assert good.stop() == 0
        assert bad.stop() == 0
        assert untrusting.stop() == 0
        listener.close()
        broker.stop()


def test_two_appliances_split_the_frames_of_a_shared_subscription(tmp_path: Path, test_model_dir: Path,
                                                                  broker: Broker) -> None:
    listener = Listener(broker.port, ["edgevl/+/results/#", "edgevl/+/status"])
    extra = _mqtt_config(broker.port, 'share_group = "line1"')
    daemons = [DaemonProcess(tmp_path / name, test_model_dir, rules=RULES_MQTT, config_extra=extra,
                             env={"EDGEVL_DEVICE_ID": name}) for name in ("station-a", "station-b")]
    for d in daemons:
        d.start()
    try:
        for d in daemons:
            d.wait_notify("mqtt connected")
        frames = 12
        pub = Publisher(broker.port)
        for info in [pub.send(TOPIC, _envelope(_jpeg(i), id=f"f-{i:02d}")) for i in range(frames)]:
            info.wait_for_publish(10)
        pub.close()
        results = listener.wait(lambda h: "/results/" in h.topic, frames, timeout=120,
                                why=lambda: daemons[0].log() + daemons[1].log())
        ids = Counter(h.json()["job_id"] for h in results)
        assert ids == Counter(f"f-{i:02d}" for i in range(frames)), "each frame answered exactly once"
        devices = Counter(h.json()["device_id"] for h in results)
        assert set(devices) == {"station-a", "station-b"}, devices
    finally:
        for d in daemons:
            assert d.stop() == 0
        listener.close()


def test_edgevl_check_names_a_bad_mqtt_key_and_a_bad_topic(tmp_path: Path) -> None:
    config = tmp_path / "edgevl.toml"
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "cam"\ntopics = ["a/#/b"]\n[[rule.question]]\nid = "q"\nask = "?"\n')
    config.write_text('rules = "rules.toml"\n[mqtt]\nhost = "127.0.0.1"\nprotocl = "5"\nqos = 3\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVL_")}
    proc = subprocess.run([sys.executable, "-m", "edgevl", "check", "-c", str(config)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2
    assert f'{config}:4: mqtt: unknown key "protocl" — did you mean "protocol"?' in proc.stderr
    assert f"{config}:5: mqtt.qos: must be one of: 0, 1 or 2" in proc.stderr
    config.write_text('rules = "rules.toml"\n[mqtt]\nhost = "127.0.0.1"\n')
    proc = subprocess.run([sys.executable, "-m", "edgevl", "check", "-c", str(config)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2
    assert "'#' must be a whole level and the last one" in proc.stderr
    assert str(rules) in proc.stderr


def test_a_message_that_cannot_be_stored_is_left_with_the_broker_and_answered_once_space_returns(
        tmp_path: Path, test_model_dir: Path, broker: Broker, small_tmpfs: Path) -> None:
    listener = Listener(broker.port, [f"{BASE}/#"])
    d = DaemonProcess(tmp_path, test_model_dir, rules=RULES_MQTT, config_extra=_mqtt_config(broker.port))
    d.move("state", small_tmpfs)
    d.start()
    try:
        d.wait_notify("mqtt connected")
        filler = fill(small_tmpfs)
        publish(broker.port, TOPIC, _envelope(_jpeg(1), id="on-full-disk"))
        deadline = time.monotonic() + 30
        while "not acknowledged, so the broker keeps it" not in d.log() and time.monotonic() < deadline:
            d.read_notify(0.1)
        assert "No space left on device" in d.log()
        assert d.proc is not None
        assert d.proc.poll() is None
        assert not listener.messages(lambda h: "/results/" in h.topic or h.topic.endswith("/errors"))
        filler.unlink()  # space comes back: the broker delivers the message again on a new connection
        result = listener.wait(_is(f"{BASE}/results/cam"), why=d.log)[0].json()
        assert result["job_id"] == "on-full-disk"
        assert "unacknowledged input delivered again" in d.log()
    finally:
        assert d.stop() == 0
    assert len(listener.messages(_is(f"{BASE}/results/cam"))) == 1
    listener.close()


def test_edgevl_check_reads_the_password_and_tls_files(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "cam"\ntopics = ["a/b"]\n[[rule.question]]\nid = "q"\nask = "?"\n')
    config = tmp_path / "edgevl.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVL_")}
    for mqtt, expected in (
        (f'username = "u"\npassword_file = "{tmp_path}/missing"', "mqtt.password_file: cannot read"),
        (f'tls = true\nca_file = "{rules}"', "mqtt.ca_file: not a usable certificate or key"),
        (f'tls = true\nca_file = "{tmp_path}/ca.pem"', f"mqtt.ca_file {tmp_path}/ca.pem: No such file or directory"),
        (f'tls = true\ncert_file = "{rules}"\nkey_file = "{tmp_path}/k.pem"',
         f"mqtt.key_file {tmp_path}/k.pem: No such file or directory"),
        ('cert_file = "/x.pem"', "cert_file and key_file go together"),
    ):
        config.write_text(f'rules = "rules.toml"\n[mqtt]\nhost = "127.0.0.1"\n{mqtt}\n')
        proc = subprocess.run([sys.executable, "-m", "edgevl", "check", "-c", str(config)], capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr


def test_kill_9_with_frames_in_the_spool_and_results_in_the_outbox_loses_nothing(
        tmp_path: Path, test_model_dir: Path, broker: Broker) -> None:
    listener = Listener(broker.port, [f"{BASE}/results/#"], client_id="dashboard", session=True)
    d = DaemonProcess(tmp_path, test_model_dir, rules=RULES_MQTT, config_extra=_mqtt_config(broker.port))
    ids = [f"m-{i:02d}" for i in range(8)]
    d.start()
    d.wait_notify("mqtt connected")
    d.freeze_worker()  # the first frame goes to a stopped worker: the others pile up in the spool
    pub = Publisher(broker.port)
    for info in [pub.send(TOPIC, _envelope(_jpeg(i), id=ids[i])) for i in range(6)]:
        info.wait_for_publish(10)
    pub.close()
    deadline = time.monotonic() + 30
    while d.log().count("took a message") < 6 and time.monotonic() < deadline:
        d.read_notify(0.1)
    d.kill()  # six frames acknowledged, in the spool, none answered
    assert len(list((d.state / "spool").iterdir())) == 6
    for i in (6, 7):  # the broker keeps these in edgevl's session meanwhile
        publish(broker.port, TOPIC, _envelope(_jpeg(i), id=ids[i]))

    broker.stop()
    d.start()  # no broker: the spool is answered into the outbox
    d.wait_records(6)
    d.wait_notify("outbox 6")
    d.kill()
    assert len(list((d.state / "mqtt" / "outbox").glob("*.json"))) == 6

    broker.start()
    d.start()
    try:
        results = listener.wait(lambda h: True, len(ids), timeout=60, why=d.log)
        d.wait_notify("queued 0, done 2")
        d.wait_notify("outbox 0")
    finally:
        assert d.stop() == 0
    answered = Counter(h.json()["job_id"] for h in listener.messages())
    assert set(answered) == set(ids), "every frame answered"
    assert len(results) == len(ids)
    on_disk = sorted(p.name for p in (d.results / "cam").iterdir())
    assert on_disk == sorted(f"{i}.json" for i in ids), "one result file per frame"
    assert not list((d.state / "spool").iterdir())
    listener.close()


def _deep_meta(job_id: str, depth: int) -> bytes:
    meta = b'{"m": ' * depth + b"1" + b"}" * depth
    return b'{"id": "' + job_id.encode() + b'", "image": "' + base64.b64encode(_jpeg(1)) + b'", "meta": ' + meta + b"}"


def test_hostile_messages_retained_frames_and_a_record_published_once(tmp_path: Path, test_model_dir: Path,
                                                                      broker: Broker) -> None:
    # Retained before edgevl subscribes: replayed by the broker at every subscription, never answered.
    publish(broker.port, TOPIC, _envelope(_jpeg(1), id="retained-1"), retain=True)
    listener = Listener(broker.port, [f"{BASE}/#"])
    d = DaemonProcess(tmp_path, test_model_dir, rules=RULES_MQTT, config_extra=_mqtt_config(broker.port))
    d.start()
    try:
        d.wait_notify("READY=1")
        listener.wait(lambda h: _status(h, "online"), why=d.log)
        # meta nested 500 and 1,500 deep: the first used to stop edgevl when the job was handed to the
        # worker, the second was never acknowledged and came back for ever.
        for i in range(21):
            publish(broker.port, TOPIC, _deep_meta(f"deep-{i}", 500 if i % 2 else 1500))
        publish(broker.port, TOPIC, _envelope(_jpeg(2), id="after-deep"))
        errors = listener.wait(_is(f"{BASE}/errors"), 21, why=d.log)
        assert {h.json()["error"]["code"] for h in errors} == {"bad_envelope"}
        assert all("nested deeper than" in h.json()["error"]["message"] for h in errors)
        listener.wait(lambda h: h.topic == f"{BASE}/results/cam" and h.json()["job_id"] == "after-deep", why=d.log)

        # A frame published with the retain flag while edgevl listens is answered, once.
        publish(broker.port, TOPIC, _envelope(_jpeg(3), id="retained-2"), retain=True)
        listener.wait(lambda h: h.topic == f"{BASE}/results/cam" and h.json()["job_id"] == "retained-2", why=d.log)

        # A folder image whose delivery is retried while the results folder cannot be written:
        # its record goes out over MQTT once, not at every retry.
        d.results.rename(tmp_path / "results-away")
        d.results.write_text("a file where the results folder should be")
        (d.inbox / "retry.jpg").write_bytes(_jpeg(4))
        d.wait_log("cannot deliver job", count=3)
        d.results.unlink()
        (tmp_path / "results-away").rename(d.results)
        d.wait_records(3)
        listener.wait(lambda h: h.topic == f"{BASE}/results/cam" and h.json()["source"]["kind"] == "folder",
                      why=d.log)
    finally:
        assert d.stop() == 0
    d.start()
    try:
        d.wait_notify("READY=1")
        publish(broker.port, TOPIC, _envelope(_jpeg(5), id="after-restart"))
        listener.wait(lambda h: h.topic == f"{BASE}/results/cam" and h.json()["job_id"] == "after-restart",
                      why=d.log)
    finally:
        assert d.stop() == 0
    results = [h.json() for h in listener.messages(_is(f"{BASE}/results/cam"))]
    ids = Counter(r["job_id"] for r in results)
    assert "retained-1" not in ids, "a retained frame is never answered at a subscription"
    assert ids["retained-2"] == 1, "answered when it was published, not again after the restart"
    assert Counter(r["source"]["kind"] for r in results)["folder"] == 1, "published once"
    assert len(listener.messages(_is(f"{BASE}/errors"))) == 21, "nothing came back after the restart"
    assert d.log().count("ignoring the retained message") == 0, "with MQTT v5 the broker does not even send it"
    listener.close()


def test_retained_frames_over_mqtt_3_1_1_are_ignored(tmp_path: Path, test_model_dir: Path, broker: Broker) -> None:
    publish(broker.port, TOPIC, _envelope(_jpeg(1), id="retained-old"), retain=True)
    listener = Listener(broker.port, [f"{BASE}/results/#"])
    d = DaemonProcess(tmp_path, test_model_dir, rules=RULES_MQTT,
                      config_extra=_mqtt_config(broker.port, 'protocol = "3.1.1"'))
    d.start()
    try:
        d.wait_notify("READY=1")
        d.wait_log("ignoring the retained message on factory/line1/cam/frame")
        publish(broker.port, TOPIC, _envelope(_jpeg(2), id="live"), protocol="3.1.1")
        listener.wait(lambda h: h.json()["job_id"] == "live", why=d.log)
    finally:
        assert d.stop() == 0
    assert [h.json()["job_id"] for h in listener.messages()] == ["live"]
    listener.close()


def test_the_frame_of_an_alarm_is_published_retained_as_jpeg(tmp_path: Path, test_model_dir: Path,
                                                             broker: Broker) -> None:
    # alarm_above = 0: every P(yes) raises the alarm; a PNG source still gives a JPEG, at most 1280 wide.
    rules = RULES_MQTT.replace("alarm_above = 0.5", "alarm_above = 0.0").replace(
        'name = "cam"', 'name = "cam"\nalarm_image = true')
    d = DaemonProcess(tmp_path, test_model_dir, rules=rules, config_extra=_mqtt_config(broker.port))
    frame = encode(noise_image(1600, 400, seed=4), "PNG")
    d.start()
    try:
        d.wait_notify("READY=1")
        listener = Listener(broker.port, [f"{BASE}/alarm_image/#"])
        publish(broker.port, TOPIC, frame)
        listener.wait(lambda h: True, 1, timeout=60, why=d.log)
        listener.close()
        # Retained: a dashboard that subscribes later gets the last alarm's frame.
        late = Listener(broker.port, [f"{BASE}/alarm_image/#"])
        heard = late.wait(lambda h: h.retain, 1, timeout=10, why=d.log)[0]
        late.close()
    finally:
        assert d.stop() == 0
    from PIL import Image

    picture = Image.open(io.BytesIO(heard.payload))
    assert (heard.topic, picture.format, picture.size) == (f"{BASE}/alarm_image/cam", "JPEG", (1280, 320))
