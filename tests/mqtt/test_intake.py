"""MQTT input at the boundary, in process: any payload ends with exactly one outcome, never an exception.

The intake runs with a real spool, outbox, seen-ids log and in-hand ledger;
only the broker is left out (tests/test_mqtt.py has it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevl.mqtt.intake import MAX_DEPTH, Inbound, MqttIntake, Rejected, parse
from edgevl.mqtt.messages import Topics
from edgevl.mqtt.outbox import Outbox
from edgevl.mqtt.seen import SeenIds
from edgevl.rules import Rule
from edgevl.spool.hand import Hand
from edgevl.spool.store import Spool
from tests.harness.images import encode, noise_image

JPEG = encode(noise_image(32, 24), "JPEG")
B64 = base64.b64encode(JPEG).decode()
RULE = Rule.model_validate({"name": "cam", "topics": ["cam/+"], "question": [{"id": "q", "ask": "?"}]})


def _intake(root: Path) -> MqttIntake:
    return MqttIntake(Spool(root / "spool"), SeenIds(root / "seen"), Outbox(root / "outbox"), Topics("edgevl", "dev"),
                      "dev", 1, 64 << 10, (RULE,), Hand(root / "in-hand.json"), lambda: None)


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"m": value}
    return value


def _deep_envelope(depth: int, job_id: str) -> bytes:
    """An envelope whose meta nests ``depth`` objects deep, written as text (no encoder recursion)."""
    meta = b'{"m": ' * depth + b"1" + b"}" * depth
    return b'{"id": "' + job_id.encode() + b'", "image": "' + B64.encode() + b'", "meta": ' + meta + b"}"


PAYLOADS = st.one_of(
    st.binary(max_size=300),
    st.just(JPEG),
    st.builds(_deep_envelope, st.integers(0, 3000), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)),
    st.builds(lambda v: json.dumps({"image": B64, "meta": v}).encode(),
              st.recursive(st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3), max_leaves=30)),
    st.builds(lambda n: b"[" * n + b"]" * n, st.integers(1, 5000)),
    st.builds(lambda n: b'{"image": "' + B64.encode() + b'", "meta": {"a": [' + b"1," * n + b"1]}}",
              st.integers(0, 10_000)),
)


@settings(deadline=None)
@given(payload=PAYLOADS, json_type=st.booleans())
def test_parse_returns_or_rejects_with_a_code(payload: bytes, json_type: bool) -> None:
    message = Inbound("cam/1", payload, "application/json" if json_type else None)
    try:
        image, _, meta = parse(message, 64 << 10)
    except Rejected as exc:
        code = exc.code
    else:
        code = "taken"
    assert code in ("taken", "bad_envelope", "bad_id", "image_empty", "payload_too_large")
    if code != "taken":
        return
    assert image
    if meta is not None:
        assert isinstance(json.loads(meta), dict)


def test_meta_nested_too_deep_is_refused_before_parsing() -> None:
    for depth in (MAX_DEPTH, 500, 1000, 100_000):
        payload = b'{"image": "' + B64.encode() + b'", "meta": ' + b'{"m": ' * depth + b"1" + b"}" * (depth + 1)
        with pytest.raises(Rejected, match="nested deeper than") as refused:
            parse(Inbound("cam/1", payload), 20 << 20)
        assert refused.value.code == "bad_envelope"
    image, _, meta = parse(Inbound("cam/1", json.dumps({"image": B64, "meta": _nested(MAX_DEPTH - 2)}).encode()),
                           1 << 20)
    assert image == JPEG
    assert meta is not None


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.tuples(PAYLOADS, st.booleans()), min_size=1, max_size=8))
def test_every_message_ends_with_one_outcome(tmp_path_factory: object, messages: list[tuple[bytes, bool]]) -> None:
    root = tmp_path_factory.mktemp("intake")  # type: ignore[attr-defined]
    intake = _intake(root)
    for payload, retained in messages:
        jobs, entries = intake.spool.count(), len(intake.outbox)
        outcome = intake.take(Inbound("cam/7", payload, retained=retained))
        new_jobs, new_entries = intake.spool.count() - jobs, len(intake.outbox) - entries
        expected = {"accepted": (1, 0), "rejected": (0, 1), "duplicate": (0, 0), "ignored": (0, 0)}[outcome]
        assert (new_jobs, new_entries) == expected, outcome
        if retained:
            assert outcome == "ignored", "retained frames are never answered"
    for job in intake.spool.pending():
        meta_json = job.meta.get("meta_json")
        assert meta_json is None or isinstance(json.loads(meta_json), dict)
        assert "meta" not in job.meta["source"], "meta travels as text"
    ledger = root / "in-hand.json"
    assert not ledger.exists() or json.loads(ledger.read_text())["held"] == {}, "nothing left in hand"


def test_storage_failures_are_not_acknowledged_and_poison_is_answered_once(tmp_path: Path) -> None:
    intake = _intake(tmp_path)
    payload = json.dumps({"id": "f-1", "image": B64}).encode()
    intake.hand.mark_poison("mqtt:" + hashlib.sha256(payload).hexdigest())
    assert intake.take(Inbound("cam/1", payload)) == "rejected"
    entry = intake.outbox.load(intake.outbox.names()[0])
    assert entry is not None
    assert json.loads(entry[0].payload)["error"]["code"] == "quarantined"
    assert intake.take(Inbound("cam/1", payload)) == "accepted", "the poison mark is used up"

    spool_root = intake.spool.root
    shutil.rmtree(spool_root)
    spool_root.write_text("a file where the spool should be")  # every write fails
    assert intake.take(Inbound("cam/1", json.dumps({"id": "f-2", "image": B64}).encode())) == "unstored"
    assert "f-2" not in intake.seen
    assert intake.take(Inbound("elsewhere", JPEG)) == "ignored"
