"""Property-based tests against one real appliance: ``edgevl run`` with the test model, a watched folder,
a real Mosquitto and the HTTP API. Whatever is generated, the daemon stays up, every regular file and every
message ends with exactly one record, and nothing else is taken.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness.broker import Broker, Listener, Publisher, free_port
from tests.harness.daemon import DaemonProcess
from tests.harness.documents import pages, pdf_of, tiff_of
from tests.harness.images import encode, noise_image

pytestmark = pytest.mark.slow

TOPIC = "factory/p/frame"
BASE = "edgevl/test-station"
JPEG = encode(noise_image(64, 48), "JPEG")
PDF = pdf_of(pages(2, size=(64, 48)))
TIFF = tiff_of(pages(2, size=(64, 48)))
DOCUMENT_ERRORS = ("document_unreadable", "document_encrypted", "page_unreadable", "too_many_pages", "image_too_large",
                   "image_unreadable")
RULES = """
[[rule]]
name = "cam"
folders = ["{inbox}"]
patterns = ["*"]
max_bytes = "64KiB"
topics = ["factory/+/frame"]
  [[rule.question]]
  id = "defect"
  ask = "Is there a visible defect?"
  type = "yes_no"
"""
# Each example costs the real daemon a second or more: a dozen in the suite, 200 with HYPOTHESIS_PROFILE=explore.
EXAMPLES = settings(max_examples=max(12, settings.default.max_examples // 10), deadline=None)


@dataclass
class Appliance:
    daemon: DaemonProcess
    broker: Broker
    listener: Listener
    port: int
    examples: int = 0

    def alive(self) -> None:
        assert self.daemon.proc is not None
        assert self.daemon.proc.poll() is None, self.daemon.log()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path) -> Iterator[Appliance]:
    root = tmp_path_factory.mktemp("appliance")
    broker = Broker(root / "broker").start()
    port = free_port()
    d = DaemonProcess(root, test_model_dir, rules=RULES, http=f"127.0.0.1:{port}", http_extra='max_upload = "256KiB"',
                      config_extra=f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nmax_payload = "128KiB"\n')
    listener = Listener(broker.port, [f"{BASE}/results/#", f"{BASE}/errors"])
    d.start()
    d.wait_notify("READY=1")
    try:
        yield Appliance(d, broker, listener, port)
    finally:
        try:
            assert d.stop() == 0
        finally:
            listener.close()
            broker.stop()


# Folders ------------------------------------------------------------------------------------------------

KINDS = ("image", "garbage", "large", "fifo", "socket", "dir", "link", "link_dev", "pdf", "tiff", "torn_pdf")
REGULAR = ("image", "garbage", "large", "pdf", "tiff", "torn_pdf")
NAMES = st.binary(min_size=1, max_size=200).filter(
    lambda b: b"/" not in b and b"\0" not in b and not b.startswith((b".", b"~$"))
    and not b.lower().endswith((b".tmp", b".part", b".crdownload", b".partial", b".swp")))


def _make(path: Path, kind: str) -> None:
    raw = os.fsencode(path)
    if kind == "image":
        path.write_bytes(JPEG)
    elif kind in ("pdf", "tiff"):
        path.write_bytes(PDF if kind == "pdf" else TIFF)
    elif kind == "torn_pdf":
        path.write_bytes(PDF[: len(raw) * 97 % len(PDF)])
    elif kind == "garbage":
        path.write_bytes(os.urandom(100))
    elif kind == "large":
        with path.open("wb") as f:
            f.truncate(10 << 30)
    elif kind == "fifo":
        os.mkfifo(raw)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(raw)
    elif kind == "dir":
        os.mkdir(raw)
    elif kind == "link":
        os.symlink(path.parent.parent / "target.jpg", raw)
    elif kind == "link_dev":
        os.symlink("/dev/zero", raw)


def _record_path(record: dict[str, Any]) -> bytes:
    source = record["source"]
    return base64.b64decode(source["path_base64"]) if "path_base64" in source else source["path"].encode()


@EXAMPLES
@given(entries=st.lists(st.tuples(NAMES, st.sampled_from(KINDS)), min_size=1, max_size=5,
                        unique_by=lambda e: e[0].lower()))
def test_any_folder_entry_gives_one_record_or_is_left_alone(appliance: Appliance,
                                                            entries: list[tuple[bytes, str]]) -> None:
    d = appliance.daemon
    (d.root / "target.jpg").write_bytes(JPEG)
    appliance.examples += 1
    made: dict[bytes, str] = {}
    for raw, kind in entries:
        path = os.fsencode(d.inbox) + b"/" + b"e%d-" % appliance.examples + raw
        _make(Path(os.fsdecode(path)), kind)
        made[path] = kind
    regular = {p for p, kind in made.items() if kind in REGULAR}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        taken = [r for r in d.records() if _record_path(r) in made]
        if len(taken) >= len(regular):
            break
        time.sleep(0.1)
    d.quiet(0.8)  # longer than settle_ms: whatever else would be taken, would be taken by now
    taken = [r for r in d.records() if _record_path(r) in made]
    assert sorted(_record_path(r) for r in taken) == sorted(regular), "one record per regular file, no more"
    for record in taken:
        kind = made[_record_path(record)]
        if kind == "large":
            assert record["error"]["code"] == "file_too_large"
        elif kind == "garbage":
            assert record["error"]["code"] in ("unsupported_format", "image_unreadable", "image_empty")
        elif kind in ("pdf", "tiff"):
            assert [p["page"] for p in record["pages"]] == [1, 2], record
        elif kind == "torn_pdf" and "error" in record:
            assert record["error"]["code"] in (*DOCUMENT_ERRORS, "image_empty", "unsupported_format"), record
    for path, kind in made.items():
        assert os.path.lexists(path) == (kind not in REGULAR), (path, kind)
        if kind == "dir":
            os.rmdir(path)
        elif kind not in REGULAR:
            os.unlink(path)
    appliance.alive()


# MQTT -----------------------------------------------------------------------------------------------------

def _deep(depth: int) -> bytes:
    return b'{"image": "' + base64.b64encode(JPEG) + b'", "meta": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


PAYLOADS = st.one_of(
    st.binary(min_size=1, max_size=200).filter(lambda b: b.strip()[:1] not in (b"{", b"")),
    st.just(JPEG),
    st.sampled_from([PDF, TIFF]),
    st.binary(max_size=300).map(lambda b: b"%PDF-1.4\n" + b),  # a document header with anything after it
    st.integers(0, len(PDF)).map(lambda n: PDF[:n]),  # a torn document
    st.builds(lambda m: json.dumps({"image": base64.b64encode(JPEG).decode(), "meta": m}).encode(),
              st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=5)),
    st.builds(_deep, st.integers(1, 3000)),
    st.binary(max_size=100).map(lambda b: b"{" + b),
    st.integers(140_000, 200_000).map(lambda n: b"\xff\xd8\xff" + bytes(n)),  # over max_payload
)


@EXAMPLES
@given(payloads=st.lists(PAYLOADS, min_size=1, max_size=6))
def test_any_mqtt_message_gives_exactly_one_record(appliance: Appliance, payloads: list[bytes]) -> None:
    listener = appliance.listener
    before = len(listener.messages())
    publisher = Publisher(appliance.broker.port)
    try:
        for info in [publisher.send(TOPIC, p) for p in payloads]:
            info.wait_for_publish(30)
    finally:
        publisher.close()
    listener.wait(lambda h: True, before + len(payloads), timeout=60, why=appliance.daemon.log)
    appliance.daemon.quiet(0.3)
    assert len(listener.messages()) == before + len(payloads), "exactly one record per message"
    appliance.alive()


# HTTP -----------------------------------------------------------------------------------------------------

BODIES = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda n: b"[" * n + b"]" * n, st.integers(1, 50_000)),
    st.builds(lambda v: json.dumps({"image": base64.b64encode(JPEG).decode(), "questions": v}).encode(),
              st.lists(st.fixed_dictionaries({"ask": st.text(min_size=1, max_size=10)}, optional={
                  "type": st.sampled_from(["text", "yes_no", "number", "bogus"]),
                  "max_tokens": st.integers(-1, 5000)}), max_size=3)),
)


@EXAMPLES
@given(body=BODIES, content_type=st.sampled_from(["application/json", "multipart/form-data; boundary=z",
                                                  "text/plain", "application/json; charset=latin-1"]))
def test_any_http_body_gets_a_status_and_a_record(appliance: Appliance, body: bytes, content_type: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", appliance.port, timeout=60)
    conn.request("POST", "/v1/ask", body=body, headers={"Content-Type": content_type})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    assert response.status in (200, 400, 413, 415, 429), (response.status, data[:200])
    assert json.loads(data)["schema"] in ("edgevl.result/2", "edgevl.error/1")
    appliance.alive()
