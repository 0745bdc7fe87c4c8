"""Documents end to end: a real ``edgevl run`` answers PDFs and multi-page TIFFs page by page from a folder,
over MQTT and over HTTP, with JSON answers held to their schema, and gives each hostile document its error
code while it goes on answering."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.harness.broker import Broker, Listener, publish
from tests.harness.daemon import DaemonProcess
from tests.harness.documents import blank_pages_pdf, bomb_pdf, encrypted_pdf, pages, pdf_of, scripted_pdf, tiff_of
from tests.http.test_http import TOKEN, Client, free_port

pytestmark = pytest.mark.slow

BASE = "edgevl/test-station"
FIELDS = {"type": "object",
          "properties": {"number": {"type": "string", "maxLength": 8},
                         "total": {"type": "integer", "minimum": 0, "maximum": 100000},
                         "signed": {"type": "boolean"}},
          "required": ["number", "total", "signed"]}

RULES = """
[[rule]]
name = "scans"
folders = ["{inbox}"]
topics = ["scanners/+/pages"]
max_pages = 5
  [[rule.question]]
  id = "signed"
  ask = "Is the page signed?"
  type = "yes_no"
  [[rule.question]]
  id = "fields"
  ask = "Extract the invoice fields."
  type = "json"
  max_tokens = 120
  schema_file = "fields.json"
  [[rule.question]]
  id = "amount"
  ask = "What is the amount due?"
  type = "number"
"""


def _record_of(d: DaemonProcess, name: str, timeout: float = 60) -> dict[str, Any]:
    """The record of the input named ``name`` (a file's name, or the MQTT topic), once it is written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in d.records():
            source = record["source"]
            if Path(source.get("path", "")).name == name or source.get("topic") == name:
                return record
        d.read_notify(0.1)
    raise AssertionError(f"no record of {name} after {timeout} s; log:\n{d.log()}")


def _check_pages(record: dict[str, Any], page_count: int, fmt: str) -> None:
    assert record["schema"] == "edgevl.result/2", record
    assert record["document"] == {"format": fmt, "page_count": page_count, "pages": list(range(1, page_count + 1))}
    assert record["answers"] == {}
    assert [p["page"] for p in record["pages"]] == list(range(1, page_count + 1))
    for page in record["pages"]:
        answers = page["answers"]
        assert set(answers) == {"signed", "fields", "amount"}
        assert isinstance(answers["signed"]["value"], bool)
        jsonschema.validate(answers["fields"]["value"], FIELDS)
        assert isinstance(answers["amount"]["value"], float)
        if fmt == "PDF":  # rendered to fit the model's max_pixels; a TIFF page has pixels of its own
            assert page["image"]["width"] * page["image"]["height"] <= 40000
        else:
            assert page["image"] == {"width": 200, "height": 280}


def test_documents_in_every_input_and_hostile_ones_each_with_their_code(tmp_path: Path, test_model_dir: Path,
                                                                          broker: Broker) -> None:
    port = free_port()
    (tmp_path / "fields.json").write_text(json.dumps(FIELDS))  # beside the rules file
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "token").chmod(0o600)
    d = DaemonProcess(tmp_path, test_model_dir, rules=RULES, http=f"127.0.0.1:{port}",
                      http_extra=f'token_file = "{tmp_path / "token"}"\nmax_upload = "4MiB"',
                      config_extra=f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nreconnect_max = 2\n')
    listener = Listener(broker.port, [f"{BASE}/#"])
    client = Client(port)
    d.start()
    try:
        d.wait_notify("READY=1")
        (d.inbox / "invoice.pdf").write_bytes(pdf_of(pages(3, seed=1)))
        publish(broker.port, "scanners/s1/pages", tiff_of(pages(2, seed=10)))
        (d.inbox / "fax.tif").write_bytes(tiff_of(pages(2, seed=30)))
        status, record = client.ask_form([("rule", "scans")], pdf_of(pages(2, seed=20)))
        assert status == 200, record
        _check_pages(record, 2, "PDF")
        # Ad-hoc questions over HTTP carry their schema inline; a file on the appliance is never read.
        adhoc = {"ask": "List the defects.", "type": "json", "max_tokens": 40,
                 "schema": {"type": "array", "items": {"type": "string", "enum": ["dent", "crack"]}, "maxItems": 2}}
        status, record = client.ask_json({"image": base64.b64encode(pdf_of(pages(1, seed=21))).decode(),
                                          "questions": [adhoc]})
        assert status == 200, record
        jsonschema.validate(record["pages"][0]["answers"]["q1"]["value"], adhoc["schema"])
        status, refused = client.ask_json({"image": base64.b64encode(pdf_of(pages(1))).decode(), "questions": [
            {"ask": "Extract.", "type": "json", "schema_file": "/etc/passwd"}]})
        assert status == 400
        assert "schema_file is for rules files" in refused["error"]["message"]

        folder = _record_of(d, "invoice.pdf")
        _check_pages(folder, 3, "PDF")
        _check_pages(_record_of(d, "fax.tif"), 2, "TIFF")
        assert folder["image_file"] == str(d.archive / "scans" / "invoice.pdf")
        results = [h.json() for h in listener.wait(lambda h: h.topic == f"{BASE}/results/scans", 2, why=d.log)]
        mqtt = next(r for r in results if r["source"]["kind"] == "mqtt")
        _check_pages(mqtt, 2, "TIFF")
        # The retained answers follow the pages in order, each with its number.
        amounts = [h.json() for h in listener.messages(lambda h: h.topic == f"{BASE}/answers/scans/amount")]
        assert [a["page"] for a in amounts if a["job_id"] == mqtt["job_id"]] == [1, 2]

        # The page shows a document's answers page by page and offers the document itself.
        status, headers, body = client.request("GET", f"/v1/results/{folder['job_id']}/image")
        assert status == 200
        assert headers["Content-Type"] == "application/pdf"
        assert body == (d.archive / "scans" / "invoice.pdf").read_bytes()

        hostile = {
            "locked.pdf": (encrypted_pdf(), "document_encrypted"),
            "torn.pdf": (pdf_of(pages(3))[:3000], "document_unreadable"),
            "garbage.pdf": (b"%PDF-1.7\n" + bytes(range(256)) * 8, "document_unreadable"),
            "long.pdf": (blank_pages_pdf(10_000), "too_many_pages"),
            "bomb.pdf": (bomb_pdf(), "image_too_large"),
            "sliver.pdf": (blank_pages_pdf(1, 14_400, 20), "page_too_large"),
        }
        for name, (data, _) in hostile.items():
            (d.inbox / name).write_bytes(data)
        (d.inbox / "scripted.pdf").write_bytes(scripted_pdf())
        (d.inbox / "poster.pdf").write_bytes(blank_pages_pdf(1, 14_400, 14_400))  # 200 x 200 inches
        by_name = {name: _record_of(d, name, 120) for name in [*hostile, "scripted.pdf", "poster.pdf"]}
        for name, (_, code) in hostile.items():
            assert by_name[name]["schema"] == "edgevl.error/1", by_name[name]
            assert by_name[name]["error"]["code"] == code, by_name[name]
            assert (d.failed / "scans" / name).is_file()
        _check_pages(by_name["scripted.pdf"], 2, "PDF")
        _check_pages(by_name["poster.pdf"], 1, "PDF")
        assert d.worker()[2] == 0, "no hostile document cost the worker its life"

        # Still answering.
        (d.inbox / "after.pdf").write_bytes(pdf_of(pages(1, seed=99)))
        _check_pages(_record_of(d, "after.pdf"), 1, "PDF")
    finally:
        assert d.stop() == 0
        listener.close()
