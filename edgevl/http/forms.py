"""How ``POST /v1/ask`` is read: a JSON body, or a multipart form with the questions as one JSON field,
as indexed fields (``question[0]``, ``type[0]``, ``options[0]``), or as repeated fields given once per
question. Every way names what is wrong in a 400, never guesses which question a field belongs to."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

import falcon
from pydantic import ValidationError

from edgevl.http.guard import ApiError
from edgevl.jsonshape import ShapeError, check_shape
from edgevl.questions import Question

MAX_DEPTH = 16
MAX_ITEMS = 10_000
MAX_QUESTIONS = 32


def questions_of(raw: list[Any], max_tokens: int) -> tuple[Question, ...]:
    if len(raw) > MAX_QUESTIONS:
        raise ApiError(400, "bad_request", f"at most {MAX_QUESTIONS} questions per request")
    out = []
    for i, q in enumerate(raw, 1):
        if not isinstance(q, dict):
            raise ApiError(400, "bad_request", "each question is an object with at least \"ask\"")
        if "schema_file" in q:  # a client must not make the appliance read its files
            raise ApiError(400, "bad_question", f"question {i}: schema_file is for rules files; send the schema "
                                                "itself as schema")
        fields = {k: v for k, v in q.items() if v not in (None, "", [])}
        fields.setdefault("id", f"q{i}")
        try:
            question = Question.model_validate(fields)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'question'}: {e['msg']}"
                                 for e in exc.errors())
            raise ApiError(400, "bad_question", f"question {i}: {problems}") from None
        if question.token_budget > max_tokens:
            raise ApiError(400, "bad_question", f"question {i}: max_tokens is at most {max_tokens} here "
                                                "(http.max_tokens)")
        out.append(question)
    return tuple(out)


_INDEXED = re.compile(r"^(question|type|options)\[(\d{1,3})\]$")


def _options(text: str) -> list[str]:
    """A JSON list of options, or options separated by commas (then no option may hold a comma)."""
    if text.strip().startswith("["):
        try:
            check_shape(text.encode(), MAX_DEPTH, MAX_ITEMS)  # nesting bounded before the parser recurses
            options = json.loads(text)
        except (ShapeError, ValueError) as exc:
            raise ApiError(400, "bad_question", f"options is not a valid JSON list: {exc}") from None
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ApiError(400, "bad_question", "options is a JSON list of texts")
        return [o.strip() for o in options]
    return [o.strip() for o in text.split(",") if o.strip()]


def _form_question(fields: dict[str, str]) -> dict[str, Any]:
    if "question" not in fields:
        raise ApiError(400, "bad_question", "type[N] or options[N] without question[N]")
    q: dict[str, Any] = {"ask": fields["question"], "type": fields.get("type", "").strip() or "text"}
    if fields.get("options", "").strip():
        q["options"] = _options(fields["options"])
    return q


def _plain_questions(plain: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Repeated question/type/options fields: a type or options field belongs to the question of the same
    position, so each must be given for every question (empty where it does not apply) or not at all;
    one type alone applies to all."""
    asks, types, options = plain["question"], plain["type"], plain["options"]
    if len(types) == 1 and len(asks) > 1:
        types = types * len(asks)
    for name, given in (("type", types), ("options", options)):
        if given and len(given) != len(asks):
            raise ApiError(400, "bad_question", f"{len(given)} {name} fields for {len(asks)} questions: give one per "
                                                "question (empty where it does not apply), or use question[N], "
                                                f"{name}[N], or one JSON field \"questions\"")
    return [_form_question({"question": ask, "type": types[i] if types else "",
                            "options": options[i] if options else ""}) for i, ask in enumerate(asks)]


def _listed_questions(text: str) -> list[dict[str, Any]]:
    try:
        check_shape(text.encode(), MAX_DEPTH, MAX_ITEMS)
        listed = json.loads(text)
    except (ShapeError, ValueError) as exc:
        raise ApiError(400, "bad_request", f"questions is not a valid JSON list: {exc}") from None
    if not isinstance(listed, list):
        raise ApiError(400, "bad_request", "questions is a JSON list of objects")
    return listed


def parse_ask(req: falcon.Request) -> tuple[bytes, str | None, list[dict[str, Any]], dict[str, Any]]:
    """(image, rule name or None, ad-hoc questions, options) from a multipart form or a JSON body."""
    media_type = (req.content_type or "").split(";")[0].strip().lower()
    if media_type == falcon.MEDIA_JSON:
        raw = req.bounded_stream.read()  # its Content-Length, checked against max_upload in on_post
        try:
            check_shape(raw, MAX_DEPTH, MAX_ITEMS)
        except ShapeError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise TypeError("the body is not an object")
            image = base64.b64decode(body["image"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise ApiError(400, "bad_request",
                           f'a JSON request is {{"image": base64, "rule": NAME}} or with "questions": {exc}'
                           ) from None
        asked = body.get("questions") or []
        options = {k: body[k] for k in ("max_pixels", "crop") if body.get(k) is not None}
        if not isinstance(asked, list):
            raise ApiError(400, "bad_request", "questions is a list of objects")
        rule = body.get("rule") or None
        if rule is not None and not isinstance(rule, str):
            raise ApiError(400, "bad_request", "rule is the name of a rule")
        return image, rule, asked, options
    if media_type != falcon.MEDIA_MULTIPART:
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data or application/json")
    image, rule, listed = b"", None, None
    plain: dict[str, list[str]] = {"question": [], "type": [], "options": []}
    indexed: dict[int, dict[str, str]] = {}
    for part in req.get_media():
        if part.name == "image":
            image = part.stream.read()
        elif part.name == "rule":
            rule = (part.get_text() or "").strip() or None
        elif part.name == "questions":
            listed = part.get_text() or ""
        elif part.name in plain:
            plain[part.name].append(part.get_text() or "")
        elif (match := _INDEXED.match(part.name or "")) is not None:
            indexed.setdefault(int(match.group(2)), {})[match.group(1)] = part.get_text() or ""
    used = [kind for kind, present in (("questions", listed is not None), ("question[N]", bool(indexed)),
                                       ("question", any(plain.values()))) if present]
    if len(used) > 1:
        raise ApiError(400, "bad_request", f"give the questions one way, not as {' and '.join(used)}")
    if listed is not None:
        return image, rule, _listed_questions(listed), {}
    if indexed:
        return image, rule, [_form_question(indexed[i]) for i in sorted(indexed)], {}
    return image, rule, _plain_questions(plain), {}
