"""The MQTT pieces that need no broker: payload parsing, the outbox, the seen ids, topic filters, messages."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from edgevl.images import image_suffix
from edgevl.mqtt.intake import Inbound, Rejected, parse
from edgevl.mqtt.messages import OutMessage, Topics, record_messages
from edgevl.mqtt.outbox import Outbox
from edgevl.mqtt.seen import SeenIds
from edgevl.records import Job
from edgevl.rules import topic_filter_problem
from tests.harness.images import encode, noise_image

JPEG = encode(noise_image(32, 24), "JPEG")


def _env(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_raw_and_enveloped_images_and_where_the_id_comes_from() -> None:
    assert parse(Inbound("t", JPEG), 1 << 20) == (JPEG, None, None)
    b64 = base64.b64encode(JPEG).decode()
    assert parse(Inbound("t", _env(id="a-1", image=b64, meta={"k": 1})), 1 << 20) == (JPEG, "a-1", '{"k":1}')
    # Detected by content type even with leading white space, and by the leading brace without one.
    assert parse(Inbound("t", b"  " + _env(image=b64), content_type="application/json"), 1 << 20)[0] == JPEG
    assert parse(Inbound("t", JPEG, correlation=b"req-7"), 1 << 20)[1] == "req-7"
    assert parse(Inbound("t", JPEG, correlation=b"\x00\xff"), 1 << 20)[1] == "00ff"
    assert parse(Inbound("t", _env(id="env", image=b64), correlation=b"corr"), 1 << 20)[1] == "env"


@pytest.mark.parametrize(("payload", "code"), [
    (b"", "image_empty"),
    (b"{", "bad_envelope"),
    (b"[1, 2]", "bad_envelope"),
    (_env(image="***"), "bad_envelope"),
    (_env(image=""), "image_empty"),
    (_env(image=base64.b64encode(JPEG).decode(), id="../x"), "bad_id"),
    (_env(image=base64.b64encode(JPEG).decode(), id="a/b"), "bad_id"),
    (_env(image=base64.b64encode(JPEG).decode(), id=7), "bad_id"),
    (_env(image=base64.b64encode(JPEG).decode(), meta="x"), "bad_envelope"),
    (_env(image=base64.b64encode(JPEG).decode(), meta={"x": "y" * 20000}), "bad_envelope"),
    (_env(image=base64.b64encode(JPEG).decode(), extra=1), "bad_envelope"),
    (bytes(2000), "payload_too_large"),
])
def test_what_is_rejected_and_with_which_code(payload: bytes, code: str) -> None:
    content_type = "application/json" if payload.startswith(b"[") else None  # a JSON array is no envelope
    with pytest.raises(Rejected) as err:
        parse(Inbound("t", payload, content_type=content_type), 1000 if code == "payload_too_large" else 1 << 20)
    assert err.value.code == code


@pytest.mark.parametrize(("payload", "correlation", "sender"), [
    (_env(id="frame-7", image="***"), None, "frame-7"),
    (_env(id="frame-7", image=""), None, "frame-7"),
    (_env(id="frame-7", image="aGk=", extra=1), None, "frame-7"),
    (_env(id="frame-7", meta="x", image="aGk="), b"corr", "frame-7"),
    (b"{", b"req-9", "req-9"),
    (_env(id="../x", image="aGk="), b"req-9", "req-9"),  # an unusable id: the correlation data's
    (bytes(2000), b"req-9", "req-9"),
    (b"{", None, None),
])
def test_a_rejected_message_keeps_the_senders_id_when_it_could_be_read(payload: bytes, correlation: bytes | None,
                                                                       sender: str | None) -> None:
    with pytest.raises(Rejected) as err:
        parse(Inbound("t", payload, correlation=correlation), 1000)
    assert err.value.sender_id == sender


def test_formats_are_sniffed_from_their_leading_bytes() -> None:
    assert image_suffix(JPEG) == ".jpg"
    assert image_suffix(encode(noise_image(8, 8), "PNG")) == ".png"
    assert image_suffix(encode(noise_image(8, 8), "WEBP")) == ".webp"
    assert image_suffix(encode(noise_image(8, 8), "GIF")) == ".gif"
    assert image_suffix(encode(noise_image(8, 8), "BMP")) == ".bmp"
    assert image_suffix(encode(noise_image(8, 8), "TIFF")) == ".tif"
    assert image_suffix(b"%PDF-1.7") == ".pdf", "a document: read page by page"
    assert image_suffix(b"%!PS-Adobe-3.0") is None
    assert image_suffix(b"") is None


def test_the_outbox_keeps_entries_in_order_once_each_across_restarts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    first = box.put([OutMessage("a", "1", 1)], key="0001")
    assert box.put([OutMessage("a", "changed", 1)], key="0001") == first, "a replayed job is kept once"
    second = box.put([OutMessage("b", "2", 1, retain=True, correlation=base64.b64encode(b"c").decode())])
    (tmp_path / "outbox" / ".tmp-crashed.part").write_bytes(b"half")
    again = Outbox(tmp_path / "outbox")
    assert again.names() == [first, second]
    assert again.load(first) == [OutMessage("a", "1", 1)]
    loaded = again.load(second)
    assert loaded is not None
    assert loaded[0].correlation_bytes == b"c"
    assert not list((tmp_path / "outbox").glob(".tmp-*"))
    again.remove(first)
    (tmp_path / "outbox" / second).write_bytes(b"not json")
    assert again.load(second) is None, "an unreadable entry is dropped, not retried forever"
    assert len(again) == 0


def test_seen_ids_survive_a_restart_and_stay_bounded(tmp_path: Path) -> None:
    seen = SeenIds(tmp_path / "seen", keep=3)
    for i in range(10):
        seen.add(f"id-{i}")
    assert "id-9" in seen
    reopened = SeenIds(tmp_path / "seen", keep=3)
    assert [i for i in (f"id-{n}" for n in range(10)) if i in reopened] == ["id-7", "id-8", "id-9"]
    assert len((tmp_path / "seen").read_text().split()) == 3


@pytest.mark.parametrize(("topic", "ok"), [
    ("factory/+/cam/frame", True), ("factory/#", True), ("#", True), ("a/b", True),
    ("a/#/b", False), ("a/b#", False), ("a/+b", False), ("", False), ("$share/g/a", False),
])
def test_topic_filters(topic: str, ok: bool) -> None:
    assert (topic_filter_problem(topic) is None) == ok


def test_a_result_becomes_a_full_record_retained_answers_and_a_reply() -> None:
    job = Job(rule="cam", source={"kind": "mqtt", "topic": "t"}, device_id="dev", job_id="j1")
    record = job.result({}, {"id": "m", "precision": "float32"},
                        {"defect": {"type": "yes_no", "value": True, "p_yes": 0.9, "confidence": 0.9, "alarm": True},
                         "count": {"type": "number", "value": None, "error": {"code": "answer_invalid"}}}, {})
    topics = Topics("edgevl", "dev")
    messages = record_messages(topics, record, 1, {"topic": "r/1", "correlation": "Yw=="})
    assert [(m.topic, m.retain) for m in messages] == [
        ("edgevl/dev/results/cam", False), ("edgevl/dev/answers/cam/defect", True),
        ("edgevl/dev/answers/cam/count", True), ("r/1", False)]
    assert json.loads(messages[1].payload) == {"value": True, "confidence": 0.9, "p_yes": 0.9, "alarm": True,
                                               "job_id": "j1", "ts": record["finished_at"]}
    assert json.loads(messages[2].payload)["error"] == {"code": "answer_invalid"}
    error = record_messages(topics, job.error("image_unreadable", "x"), 1)
    assert [m.topic for m in error] == ["edgevl/dev/errors"]
