"""The HTTP API at its boundary, in process: any request gets a status and an error record, never a 500.

The real Falcon application and request queue; a thread stands in for the
model worker and answers every queued job at once (tests/test_http.py runs the
real daemon over real sockets).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevl.config import HttpSettings
from edgevl.rules import Rule
from tests.harness.http import HOST, in_process_api
from tests.harness.images import encode, noise_image

JPEG = encode(noise_image(32, 24), "JPEG")
B64 = base64.b64encode(JPEG).decode()
RULE = Rule.model_validate({"name": "cam", "question": [{"id": "q", "ask": "?"}]})
ALLOWED = {200, 400, 403, 413, 415, 429}


@pytest.fixture(scope="module")
def client() -> Iterator[falcon.testing.TestClient]:
    with in_process_api(HttpSettings(listen=HOST, max_upload=1 << 20, request_timeout=5), (RULE,)) as test_client:
        yield test_client


def _post(client: falcon.testing.TestClient, body: bytes, content_type: str | None,
          headers: dict[str, str] | None = None) -> falcon.testing.Result:
    all_headers = {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
    return client.simulate_post("/v1/ask", body=body, headers=all_headers)


def _check(result: falcon.testing.Result) -> dict[str, Any]:
    assert result.status_code in ALLOWED, (result.status_code, result.text[:300])
    assert "Traceback" not in result.text
    data: dict[str, Any] = json.loads(result.text)
    assert data["schema"] in ("edgevl.result/2", "edgevl.error/1")
    return data


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=25)
QUESTION = st.fixed_dictionaries({"ask": st.text(max_size=20)}, optional={
    "id": st.text(max_size=10), "type": st.sampled_from(["text", "yes_no", "choice", "number", "json", "bogus"]),
    "options": st.lists(st.text(max_size=5), max_size=4), "max_tokens": st.integers(-5, 5000),
    "alarm_above": st.floats(-1, 2)})
ASKS = st.fixed_dictionaries({"image": st.sampled_from([B64, "", "@@", B64[:40]])}, optional={
    "rule": st.sampled_from(["cam", "nope", 7, None]), "questions": st.lists(QUESTION, max_size=40) | JSON_VALUES,
    "max_pixels": st.integers(-10, 1 << 25) | JSON_VALUES, "crop": st.lists(st.integers(-5, 100), max_size=5)})


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(ASKS.map(lambda a: json.dumps(a).encode()), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                      st.binary(max_size=200), st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n)),
       content_type=st.sampled_from(["application/json", "multipart/form-data; boundary=x", "text/plain", None]))
def test_any_body_gets_a_status_and_an_error_record(client: falcon.testing.TestClient, body: bytes,
                                                    content_type: str | None) -> None:
    data = _check(_post(client, body, content_type))
    if data["schema"] == "edgevl.result/2":
        assert content_type == "application/json"


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.tuples(st.sampled_from(["image", "rule", "question", "type", "options", "x"]),
                                st.binary(max_size=50) | st.just(JPEG)), max_size=40))
def test_any_multipart_form_gets_a_status_and_an_error_record(client: falcon.testing.TestClient,
                                                             parts: list[tuple[str, bytes]]) -> None:
    body = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"" + name.encode() + b"\"\r\n\r\n" + value + b"\r\n"
                    for name, value in parts) + b"--b--\r\n"
    _check(_post(client, body, "multipart/form-data; boundary=b"))


def test_requests_are_bounded_by_the_configuration(client: falcon.testing.TestClient) -> None:
    def ask(**fields: Any) -> tuple[int, dict[str, Any]]:
        result = _post(client, json.dumps({"image": B64, **fields}).encode(), "application/json")
        return result.status_code, _check(result)

    status, record = ask(questions=[{"ask": "?"}], max_pixels=16_777_216)
    assert (status, record["error"]["code"]) == (400, "bad_request")
    assert "at most 200704" in record["error"]["message"]
    assert ask(questions=[{"ask": "?"}], max_pixels=40_000)[0] == 200
    status, record = ask(questions=[{"ask": "?", "max_tokens": 2000}])
    assert (status, record["error"]["code"]) == (400, "bad_question")
    assert "http.max_tokens" in record["error"]["message"]
    assert ask(questions=[{"ask": "?"}] * 33)[0] == 400
    status, record = ask(rule="cam")
    assert (status, record["schema"]) == (200, "edgevl.result/2")


def test_deep_and_huge_json_is_refused_before_parsing(client: falcon.testing.TestClient) -> None:
    deep = _post(client, b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json")
    assert (deep.status_code, _check(deep)["error"]["message"]) == (400, "JSON nested deeper than 16 levels")
    bomb = _post(client, b"[" + b"[]," * 300_000 + b"[]]", "application/json")
    assert (bomb.status_code, _check(bomb)["error"]["code"]) == (400, "bad_request")
    big = _post(client, b'{"image": "' + b"A" * (2 << 20) + b'"}', "application/json")
    assert (big.status_code, _check(big)["error"]["code"]) == (413, "payload_too_large")


@pytest.mark.parametrize(("host", "origin", "site", "status"), [
    (HOST, None, None, 200),
    ("localhost:8080", "http://localhost:8080", "same-origin", 200),
    ("[::1]:8080", None, None, 200),
    ("192.168.1.7:8080", None, None, 200),
    ("evil.example:8080", None, None, 400),  # DNS rebinding: a name of the attacker's
    (HOST, "http://evil.example", None, 403),  # a form posted from another site
    (HOST, "null", None, 403),
    (HOST, None, "cross-site", 403),
])
def test_host_and_origin_checks(client: falcon.testing.TestClient, host: str, origin: str | None, site: str | None,
                                status: int) -> None:
    headers = {"Host": host, **({"Origin": origin} if origin else {}), **({"Sec-Fetch-Site": site} if site else {})}
    result = _post(client, json.dumps({"image": B64, "rule": "cam"}).encode(), "application/json", headers)
    assert result.status_code == status, result.text
    page = client.simulate_get("/", headers={"Host": host})
    if status != 400:
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Frame-Options"] == "DENY"


def test_a_token_file_others_may_read_is_refused(tmp_path: Path) -> None:
    from edgevl.errors import ConfigError

    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o644)
    with pytest.raises(ConfigError, match=r"open to other users \(mode 0644\); chmod o-rwx"):
        HttpSettings(token_file=token).token()
    token.chmod(0o640)
    assert HttpSettings(token_file=token).token() == "secret"
