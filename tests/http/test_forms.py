"""Ad-hoc questions in a multipart form, each way it may be written; the real application, in process."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import falcon.testing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevl.config import HttpSettings
from edgevl.http.jobs import HttpJob
from tests.harness.http import HOST, in_process_api
from tests.harness.images import encode, noise_image

JPEG = encode(noise_image(32, 24), "JPEG")


def _echo(job: HttpJob) -> dict[str, Any]:
    """The questions as the application read them."""
    return {q.id: {"value": {"ask": q.ask, "type": q.type, "options": list(q.options)}} for q in job.rule.questions}


@pytest.fixture(scope="module")
def client() -> Iterator[falcon.testing.TestClient]:
    with in_process_api(HttpSettings(listen=HOST, request_timeout=5), answers=_echo) as test_client:
        yield test_client


def _form(client: falcon.testing.TestClient, fields: list[tuple[str, str]]) -> tuple[int, Any]:
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in fields:
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="f.jpg"\r\n'
             "Content-Type: image/jpeg\r\n\r\n").encode() + JPEG + f"\r\n--{boundary}--\r\n".encode()
    result = client.simulate_post("/v1/ask", body=body,
                                  headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return result.status_code, result.json


def _asked(record: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    return [(a["value"]["ask"], a["value"]["type"], a["value"]["options"]) for a in record["answers"].values()]


def test_questions_as_one_json_field(client: falcon.testing.TestClient) -> None:
    status, record = _form(client, [("questions", json.dumps([
        {"ask": "Defect?", "type": "yes_no"},
        {"id": "size", "ask": "Which size?", "type": "choice", "options": ["10, 20 mm", "30 mm"]}]))])
    assert status == 200, record
    assert _asked(record) == [("Defect?", "yes_no", []), ("Which size?", "choice", ["10, 20 mm", "30 mm"])]
    assert list(record["answers"]) == ["q1", "size"]


def test_indexed_fields_in_any_order(client: falcon.testing.TestClient) -> None:
    status, record = _form(client, [("options[1]", '["a, b", "c"]'), ("question[1]", "Which?"),
                                    ("type[1]", "choice"), ("question[0]", "Read it.")])
    assert status == 200, record
    assert _asked(record) == [("Read it.", "text", []), ("Which?", "choice", ["a, b", "c"])]


def test_repeated_fields_once_per_question(client: falcon.testing.TestClient) -> None:
    status, record = _form(client, [("question", "Read it."), ("type", "text"), ("options", ""),
                                    ("question", "Which?"), ("type", "choice"), ("options", "x, y")])
    assert status == 200, record
    assert _asked(record) == [("Read it.", "text", []), ("Which?", "choice", ["x", "y"])]
    # One type for all questions.
    status, record = _form(client, [("question", "A?"), ("question", "B?"), ("type", "yes_no")])
    assert status == 200, record
    assert [t for _, t, _ in _asked(record)] == ["yes_no", "yes_no"]


@pytest.mark.parametrize(("fields", "message"), [
    # A lone options field no longer attaches itself to the first question.
    ([("question", "Read it."), ("question", "Which?"), ("type", "text"), ("type", "choice"), ("options", "x, y")],
     "1 options fields for 2 questions"),
    ([("questions", "[1, 2"), ("question", "x")], "give the questions one way, not as questions and question"),
    ([("questions", "{not json")], "questions is not a valid JSON list"),
    ([("type[0]", "text")], "type[N] or options[N] without question[N]"),
    ([("question[0]", "Which?"), ("type[0]", "choice"), ("options[0]", '["a", 3]')], "options is a JSON list of texts"),
    ([("question[0]", "Which?"), ("type[0]", "choice"), ("options[0]", "[" * 50_000)], "not a valid JSON list"),
    ([("questions", "[" * 50_000)], "not a valid JSON list"),
])
def test_ambiguous_or_broken_forms_are_refused_with_the_reason(client: falcon.testing.TestClient,
                                                               fields: list[tuple[str, str]], message: str) -> None:
    status, record = _form(client, fields)
    assert status == 400
    assert message in record["error"]["message"]


_NAMES = st.sampled_from(["question", "type", "options", "questions", "question[0]", "type[0]", "options[0]",
                          "question[1]", "options[7]", "rule", "other"])
_VALUES = st.one_of(st.text(max_size=60), st.sampled_from(["yes_no", "choice", "a, b", '["a", "b"]', "[", "[[[",
                                                            '[{"ask": "x"}]', "{}", "null"]))


@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=8))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
def test_any_form_is_answered_or_refused_never_a_500(client: falcon.testing.TestClient,
                                                     fields: list[tuple[str, str]]) -> None:
    safe = [(n, v.replace("\r", " ")) for n, v in fields]  # a CR in a part would end its headers early
    status, record = _form(client, safe)
    assert status in (200, 400), (status, record)
    if status == 400:
        assert record["error"]["message"]
