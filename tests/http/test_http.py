"""The HTTP API of a real ``edgevl run`` with the test model: every endpoint, the token, bad uploads, a full queue."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.broker import free_port
from tests.harness.daemon import DaemonProcess
from tests.harness.images import encode, noise_image

pytestmark = pytest.mark.slow

TOKEN = "t0ken-for-tests"


def _jpeg(seed: int) -> bytes:
    return encode(noise_image(160, 120, seed=seed), "JPEG")


class Client:
    def __init__(self, port: int, token: str | None = TOKEN) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                token: str | None = "default") -> tuple[int, Any, bytes]:
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        token = self.token if token == "default" else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        status, _, body = self.request("GET", path, **kw)
        return status, json.loads(body) if body.startswith((b"{", b"[")) else body.decode()

    def ask_json(self, payload: dict[str, Any]) -> tuple[int, Any]:
        status, _, body = self.request("POST", "/v1/ask", json.dumps(payload).encode(), "application/json")
        return status, json.loads(body)

    def ask_form(self, fields: list[tuple[str, str]], image: bytes | None, **kw: Any) -> tuple[int, Any]:
        boundary = uuid.uuid4().hex
        out = b""
        for name, value in fields:
            out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
        if image is not None:
            out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"frame.jpg\"\r\n"
                    "Content-Type: image/jpeg\r\n\r\n").encode() + image + b"\r\n"
        out += f"--{boundary}--\r\n".encode()
        status, _, body = self.request("POST", "/v1/ask", out, f"multipart/form-data; boundary={boundary}", **kw)
        return status, json.loads(body)


def _daemon(tmp_path: Path, model: Path, extra: str = "") -> tuple[DaemonProcess, Client]:
    port = free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "token").chmod(0o600)  # a secret others may read is refused
    d = DaemonProcess(tmp_path, model, http=f"127.0.0.1:{port}",
                      http_extra=f'token_file = "{tmp_path / "token"}"\nmax_upload = "64KiB"\n{extra}')
    return d, Client(port)


def test_every_endpoint_with_the_token_and_bad_uploads(tmp_path: Path, test_model_dir: Path) -> None:
    d, client = _daemon(tmp_path, test_model_dir)
    d.start()
    try:
        d.wait_notify("READY=1")
        assert client.get("/healthz", token=None) == (200, {"ok": True, "worker": "ready", "inputs": "watching",
                                                           "stopping": False})
        status, headers, body = client.request("GET", "/v1/rules", token=None)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(body)["error"]["code"] == "unauthorized"
        assert client.get("/v1/rules", token="wrong")[0] == 401
        assert client.get("/metrics", token=None)[0] == 401
        status, page = client.get("/", token=None)
        assert status == 200
        assert "<title>edgevl</title>" in page

        status, rules = client.get("/v1/rules")
        assert status == 200
        assert [r["name"] for r in rules["rules"]] == ["cam"]
        assert [q["id"] for q in rules["rules"][0]["question"]] == ["defect", "label"]

        (d.inbox / "from-folder.jpg").write_bytes(_jpeg(1))
        folder_record = d.wait_records(1)[0]
        # The record says where its image is, and both can be fetched by the job id.
        assert folder_record["image_file"] == str(d.archive / "cam" / "from-folder.jpg")
        job = folder_record["job_id"]
        assert client.get(f"/v1/results/{job}") == (200, folder_record)
        status, headers, body = client.request("GET", f"/v1/results/{job}/image")
        assert (status, headers["Content-Type"]) == (200, "image/jpeg")
        assert body == _jpeg(1)
        assert client.get(f"/v1/results/{job}/image", token=None)[0] == 401
        assert client.get("/v1/results/no-such-job")[1]["error"]["code"] == "not_found"
        assert client.get("/v1/results/..%2F..%2Fetc%2Fpasswd/image")[0] == 404

        status, record = client.ask_form([("rule", "cam")], _jpeg(2))
        assert status == 200, record
        assert record["schema"] == "edgevl.result/2"
        assert record["source"] == {"kind": "http"}
        assert record["rule"] == "cam"
        assert set(record["answers"]) == {"defect", "label"}
        assert 0 <= record["answers"]["defect"]["confidence"] <= 1
        assert "question" not in record["answers"]["defect"], "a rule's questions are in the rule"
        assert "image_file" not in record, "an uploaded image is not kept"
        assert client.get(f"/v1/results/{record['job_id']}/image")[1]["error"]["code"] == "image_not_kept"

        status, record = client.ask_json({"image": base64.b64encode(_jpeg(3)).decode(), "questions": [
            {"id": "ok", "ask": "Is the part OK?", "type": "yes_no"},
            {"ask": "Which side is up?", "type": "choice", "options": ["top", "bottom"]}]})
        assert status == 200, record
        assert record["rule"] == "adhoc"
        assert record["answers"]["ok"]["type"] == "yes_no"
        assert record["answers"]["ok"]["question"] == "Is the part OK?", "an ad-hoc question's text is kept"
        assert record["answers"]["q2"]["question"] == "Which side is up?"
        assert record["answers"]["q2"]["value"] in ("top", "bottom")
        assert set(record["answers"]["q2"]["probabilities"]) == {"top", "bottom"}

        status, record = client.ask_form([("question", "Count the screws."), ("type", "number"),
                                          ("question", "Colour?"), ("type", "choice"), ("options", ""),
                                          ("options", "red, green")], _jpeg(4))
        assert status == 200, record
        assert [a["type"] for a in record["answers"].values()] == ["number", "choice"]

        # Bad requests: each with its status and an error record.
        status, record = client.ask_form([("rule", "cam")], _jpeg(5)[:300])
        assert (status, record["error"]["code"]) == (400, "image_unreadable")
        assert client.ask_form([("rule", "cam")], b"GIF90 not an image")[1]["error"]["code"] == "unsupported_format"
        status, record = client.ask_form([("rule", "cam")], b"%PDF-1.7 not a document")
        assert (status, record["error"]["code"]) == (400, "document_unreadable")
        status, record = client.ask_form([("rule", "cam")], None)
        assert (status, record["error"]["code"]) == (400, "image_empty")
        assert client.ask_form([("rule", "nope")], _jpeg(6))[1]["error"]["code"] == "rule_missing"
        assert client.ask_form([], _jpeg(6))[0] == 400
        big = b"\xff\xd8\xff" + bytes(100 << 10)
        status, record = client.ask_form([("rule", "cam")], big)
        assert (status, record["error"]["code"]) == (413, "payload_too_large")
        status, record = client.ask_json({"image": "@@@", "rule": "cam"})
        assert (status, record["error"]["code"]) == (400, "bad_request")
        status, record = client.ask_json({"image": base64.b64encode(_jpeg(7)).decode(),
                                          "questions": [{"ask": "?", "type": "choice"}]})
        assert (status, record["error"]["code"]) == (400, "bad_question")
        assert client.request("POST", "/v1/ask", b"x", "text/plain")[0] == 415

        status, results = client.get("/v1/results?rule=cam&limit=5")
        assert status == 200
        kinds = [r["source"]["kind"] for r in results["results"]]
        assert kinds[-1] == "folder"
        assert "http" in kinds
        assert all(r["rule"] == "cam" for r in results["results"])
        assert len(client.get("/v1/results?limit=1")[1]["results"]) == 1

        status, text = client.get("/metrics")
        assert status == 200
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert samples[("edgevl_jobs_total", (("outcome", "answered"), ("source", "http")))] == 3
        assert samples[("edgevl_jobs_total", (("outcome", "answered"), ("source", "folder")))] == 1
        assert samples[("edgevl_jobs_total", (("outcome", "image_unreadable"), ("source", "http")))] == 1
        assert samples[("edgevl_stage_seconds_count", (("stage", "total"),))] == 4
        assert samples[("edgevl_worker_restarts_total", ())] == 0
        assert not [k for k in samples if k[0].endswith("_created")], "no _created series"
        assert samples[("edgevl_last_result_timestamp_seconds", (("rule", "cam"),))] > time.time() - 600
        families = {f.name: f.type for f in text_string_to_metric_families(text)}
        assert families["edgevl_jobs"] == families["edgevl_worker_restarts"] == "counter"
        assert families["edgevl_queue_depth"] == "gauge"
        assert samples[("edgevl_worker_up", ())] == 1
        assert samples[("edgevl_worker_rss_bytes", ())] > 50e6
        assert samples[("edgevl_queue_depth", ())] == 0
        info = next(k for k in samples if k[0] == "edgevl_model_info")
        assert ("precision", "float32") in info[1]

        status, state = client.get("/v1/status")
        assert status == 200
        # Failed: a torn image and a torn PDF.
        assert (state["done"], state["failed"], state["worker"]["state"]) == (4, 2, "ready")

        # The worker dies: /healthz says 503 until its replacement has loaded the model.
        os.kill(state["worker"]["pid"], signal.SIGKILL)
        seen = set()
        deadline = time.monotonic() + 60
        while (seen != {503, 200} or client.get("/healthz", token=None)[0] != 200) and time.monotonic() < deadline:
            status, health = client.get("/healthz", token=None)
            seen.add(status)
            if status == 503:
                assert health["worker"] in ("down", "loading")
        assert seen == {503, 200}
        assert client.get("/v1/status")[1]["worker"]["restarts"] == 1
    finally:
        assert d.stop() == 0


def test_a_full_queue_answers_429_and_people_go_before_the_folders(tmp_path: Path, test_model_dir: Path) -> None:
    d, client = _daemon(tmp_path, test_model_dir, "max_waiting = 1")
    d.start()
    answers: dict[str, tuple[int, Any]] = {}

    def ask(name: str) -> None:
        answers[name] = client.ask_form([("rule", "cam")], _jpeg(len(name)))

    try:
        d.wait_notify("READY=1")
        worker = d.freeze_worker()  # the first person's job runs for as long as the test wants
        first = threading.Thread(target=ask, args=("first",))
        first.start()
        d.wait_worker("busy")
        (d.inbox / "waiting.jpg").write_bytes(_jpeg(9))  # settles while the person's job runs
        second = threading.Thread(target=ask, args=("second",))
        second.start()
        d.wait_notify("queued 2")  # the second request and the file
        status, record = client.ask_form([("rule", "cam")], _jpeg(1))
        assert (status, record["error"]["code"]) == (429, "busy")
        assert client.get("/healthz", token=None)[0] == 200
        d.thaw_worker(worker)
        first.join(60)
        second.join(60)
        assert answers["first"][0] == 200
        assert answers["second"][0] == 200
        d.wait_records(1)
        done = [r["source"]["kind"] for r in client.get("/v1/results?limit=10")[1]["results"]]
        assert done == ["folder", "http", "http"], "the waiting person before the waiting file"
    finally:
        assert d.stop() == 0


def test_on_sigterm_the_running_request_is_answered_and_the_waiting_one_gets_503(tmp_path: Path,
                                                                                  test_model_dir: Path) -> None:
    d, client = _daemon(tmp_path, test_model_dir)
    d.start()
    answers: dict[str, tuple[int, Any]] = {}

    def ask(name: str) -> None:
        answers[name] = client.ask_form([("rule", "cam")], _jpeg(len(name)))

    threads = {name: threading.Thread(target=ask, args=(name,)) for name in ("running", "waiting")}
    try:
        d.wait_notify("READY=1")
        worker = d.freeze_worker()
        threads["running"].start()
        d.wait_worker("busy")
        threads["waiting"].start()
        d.wait_notify("queued 1")
        d.signal(signal.SIGTERM)
        threads["waiting"].join(30)
        status, record = answers["waiting"]
        assert (status, record["error"]["code"]) == (503, "stopping")
        assert client.get("/healthz", token=None)[1]["stopping"] is True
        d.thaw_worker(worker)
        threads["running"].join(30)
        assert answers["running"][0] == 200
    finally:
        assert d.stop() == 0


def _hardened(tmp_path: Path, model: Path, extra: str) -> tuple[DaemonProcess, Client]:
    port = free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "token").chmod(0o600)
    d = DaemonProcess(tmp_path, model, http=f"127.0.0.1:{port}",
                      http_extra=f'token_file = "{tmp_path / "token"}"\n{extra}')
    return d, Client(port)


def _closed(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed ``sock`` (within ``timeout``)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_idle_and_slow_clients_do_not_take_the_api_away(tmp_path: Path, test_model_dir: Path) -> None:
    d, client = _hardened(tmp_path, test_model_dir, "read_timeout = 2\nidle_timeout = 3")
    d.start()
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    try:
        d.wait_notify("READY=1")
        port = int(client.base.rsplit(":", 1)[1])
        for _ in range(150):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        for _ in range(5):  # slow-loris: headers one line at a time, never finished
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(s)
        started = time.monotonic()
        assert client.get("/healthz", token=None)[0] == 200
        assert time.monotonic() - started < 10
        assert client.ask_form([("rule", "cam")], _jpeg(1))[0] == 200
        dripping_until = time.monotonic() + 8
        closed_after = None
        while time.monotonic() < dripping_until and closed_after is None:
            try:
                for s in slow:
                    s.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
            time.sleep(0.3)
        assert closed_after is not None, "a request must arrive within read_timeout"
        assert closed_after < 8
        assert _closed(idle[0], 8), "idle connections are closed after idle_timeout"
        assert client.get("/healthz", token=None)[0] == 200
    finally:
        for s in idle + slow:
            s.close()
        assert d.stop() == 0


def test_requests_are_bounded_timed_out_and_never_starve_the_folders(tmp_path: Path, test_model_dir: Path) -> None:
    d, client = _hardened(tmp_path, test_model_dir, "request_timeout = 3")
    d.start()
    stop = threading.Event()
    asked: list[int] = []
    threads: list[threading.Thread] = []

    def loop_asking() -> None:
        while not stop.is_set():
            asked.append(client.ask_form([("rule", "cam")], _jpeg(len(asked)))[0])

    try:
        d.wait_notify("READY=1")
        assert d.proc is not None
        before = d.peak_rss()
        bomb = b"[" + b"[]," * (6_900_000) + b"[]]"  # 20 MiB of nothing
        status, _, body = client.request("POST", "/v1/ask", bomb, "application/json")
        assert (status, json.loads(body)["error"]["code"]) == (400, "bad_request")
        status, _, body = client.request("POST", "/v1/ask", b"[" * 100_000 + b"]" * 100_000, "application/json")
        assert status == 400
        assert b"Traceback" not in body
        assert d.peak_rss() - before < 150 << 20, "refused before a parser built anything"
        status, record = client.ask_json({"image": base64.b64encode(_jpeg(1)).decode(),
                                          "questions": [{"ask": "?"}], "max_pixels": 16_777_216})
        assert (status, record["error"]["code"]) == (400, "bad_request")
        req = urllib.request.Request(client.base + "/v1/rules", headers={"Host": "rebind.example:8080",
                                                                         "Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 400
        boundary = "b"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"rule\"\r\n\r\ncam\r\n--{boundary}--\r\n")
        req = urllib.request.Request(client.base + "/v1/ask", data=form.encode(), method="POST", headers={
            "Origin": "http://evil.example", "Content-Type": f"multipart/form-data; boundary={boundary}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)  # a cross-site form post, even without the token
        assert refused.value.code == 403

        # request_timeout holds even while the model is busy: a stopped worker never answers.
        worker = client.get("/v1/status")[1]["worker"]["pid"]
        os.kill(worker, signal.SIGSTOP)
        started = time.monotonic()
        status, record = client.ask_form([("rule", "cam")], _jpeg(2))
        assert (status, record["error"]["code"]) == (503, "timeout")
        assert time.monotonic() - started < 8
        os.kill(worker, signal.SIGCONT)

        # Five clients asking in a loop: the folder's images still get their turn.
        threads += [threading.Thread(target=loop_asking) for _ in range(5)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(asked) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        for i in range(3):
            (d.inbox / f"f{i}.jpg").write_bytes(_jpeg(10 + i))
        d.wait_records(3, timeout=60)
        assert not stop.is_set()
        assert len(asked) >= 5, "the clients were asking all along"
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        assert d.stop() == 0
    assert set(asked) <= {200, 429}
