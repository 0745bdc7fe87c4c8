"""The local HTTP API and commissioning page (Falcon, a WSGI framework; served by waitress: ``server``).

Every request needs ``Authorization: Bearer <token>`` when ``http.token_file``
is set, except ``/healthz`` (for the service manager and load balancers) and the
page itself, which holds no data and asks for the token before calling the API.

What a browser could be tricked into is refused first (``guard``). A request
is bounded before it is parsed (size, JSON nesting and element count), and what
it asks for is bounded by the configuration (``max_pixels``, ``max_tokens``, the
number of questions).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import falcon
from pydantic import ValidationError

from edgevl.config import HttpSettings
from edgevl.errors import ImageError
from edgevl.http.evidence import Result, ResultImage
from edgevl.http.forms import parse_ask, questions_of
from edgevl.http.guard import ApiError, Guard
from edgevl.http.jobs import HttpJob, HttpQueue, QueueFull, RecentRecords
from edgevl.http.metrics import Metrics
from edgevl.images import accepted_suffix
from edgevl.records import ERROR_SCHEMA, Job, Source, is_error
from edgevl.rules import Rule

log = logging.getLogger(__name__)

ADHOC_RULE = "adhoc"
PUBLIC = ("/", "/healthz")

# HTTP status of an error record, by its code.
_STATUS = {
    "image_empty": 400, "image_unreadable": 400, "unsupported_format": 400, "crop_outside_image": 400,
    "document_unreadable": 400, "document_encrypted": 400, "page_not_found": 400, "page_unreadable": 400,
    "too_many_pages": 413, "page_too_large": 413,
    "image_too_large": 413, "memory_limit": 503, "worker_crashed": 503, "worker_stalled": 503, "stopping": 503,
}


@dataclass
class Backend:
    """What the API needs of the daemon."""

    device_id: str
    rules: Callable[[], tuple[Rule, ...]]
    queue: HttpQueue
    recent: RecentRecords
    health: Callable[[], tuple[bool, dict[str, Any]]]
    status: Callable[[], dict[str, Any]]
    metrics: Metrics
    max_pixels: int  # model.max_pixels: no request encodes an image larger
    image_roots: Callable[[], list[Path]] = field(default=list)  # where images named by records may be served


def _send_json(resp: falcon.Response, data: Any, status: int = 200) -> None:
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(data, ensure_ascii=False)


def _error_body(code: str, message: str) -> dict[str, Any]:
    return {"schema": ERROR_SCHEMA, "error": {"code": code, "message": message}}


class _Auth:
    def __init__(self, token: str | None) -> None:
        self.token = token

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.token is None or req.path in PUBLIC:
            return
        given = req.get_header("Authorization") or ""
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise ApiError(401, "unauthorized", 'this API needs "Authorization: Bearer <token>" (http.token_file)',
                           {"WWW-Authenticate": 'Bearer realm="edgevl"'})


class _Page:
    def __init__(self) -> None:
        self.html = resources.files("edgevl.http").joinpath("web/index.html").read_bytes()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.data = self.html
        resp.set_header("Cache-Control", "no-store")
        resp.set_header("Content-Security-Policy",
                        "default-src 'self'; img-src 'self' blob: data:; style-src 'unsafe-inline'; "
                        "script-src 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'")


class _Health:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ok, detail = self.backend.health()
        _send_json(resp, {"ok": ok, **detail}, 200 if ok else 503)


class _Metrics:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = self.backend.metrics.text()


class _Rules:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        rules = [r.model_dump(mode="json", by_alias=True) for r in self.backend.rules()]
        _send_json(resp, {"rules": rules})


class _Status:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _send_json(resp, self.backend.status())


class _Results:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = req.get_param_as_int("limit", min_value=1, max_value=1000, default=20)
        rule = req.get_param("rule") or None
        _send_json(resp, {"results": self.backend.recent.latest(rule, limit or 20)})


class _Ask:
    def __init__(self, backend: Backend, settings: HttpSettings) -> None:
        self.backend = backend
        self.settings = settings

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = int(self.settings.max_upload)
        if req.content_length is not None and req.content_length > limit:
            raise ApiError(413, "payload_too_large", f"the request is over http.max_upload ({limit} bytes)")
        if not req.content_length:  # the form parser cannot take a body of unknown length
            raise ApiError(400, "image_empty", "the request has no body (multipart field \"image\", or JSON)")
        image, rule_name, questions, options = parse_ask(req)
        if not image:
            raise ApiError(400, "image_empty", "no image in the request (multipart field \"image\")")
        try:
            accepted_suffix(image)
        except ImageError as exc:
            raise ApiError(400, exc.code, exc.message) from None
        if rule_name is not None and questions:
            raise ApiError(400, "bad_request", "give a rule or questions, not both")
        if rule_name is not None:
            rule = next((r for r in self.backend.rules() if r.name == rule_name), None)
            if rule is None:
                known = ", ".join(r.name for r in self.backend.rules())
                raise ApiError(400, "rule_missing", f"no rule named {rule_name!r} (rules: {known})")
        elif questions:
            max_pixels = options.get("max_pixels")
            if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels > self.backend.max_pixels):
                raise ApiError(400, "bad_request", f"max_pixels is a whole number of at most {self.backend.max_pixels} "
                                                   "here (model.max_pixels)")
            asked = questions_of(questions, self.settings.max_tokens)
            try:
                rule = Rule.model_validate({"name": ADHOC_RULE, "question": asked, **options})
            except ValidationError as exc:
                raise ApiError(400, "bad_request", str(exc.errors()[0]["msg"])) from None
        else:
            raise ApiError(400, "bad_request", "give a rule (rule=NAME) or at least one question")
        job = HttpJob(Job(rule=rule.name, source=Source(kind="http"), device_id=self.backend.device_id), image, rule)
        try:
            self.backend.queue.put(job)
        except QueueFull as exc:
            raise ApiError(429 if self.backend.queue.open else 503, "busy", str(exc), {"Retry-After": "5"}) from None
        try:
            record = job.future.result(timeout=self.settings.request_timeout)
        except FutureTimeout:
            if self.backend.queue.withdraw(job):
                raise ApiError(503, "timeout", "the model did not get to this request within "
                                               "http.request_timeout") from None
            # It runs: its answer goes to the latest results, this request ends now.
            raise ApiError(503, "timeout", "the answer took longer than http.request_timeout; it will be "
                                           "among GET /v1/results") from None
        _send_json(resp, record, _STATUS.get(record["error"]["code"], 500) if is_error(record) else 200)


def _handle_api_error(req: falcon.Request, resp: falcon.Response, exc: ApiError, params: dict[str, Any]) -> None:
    _send_json(resp, _error_body(exc.code, exc.message), exc.status)
    for name, value in exc.headers.items():
        resp.set_header(name, value)


def _handle_http_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError,
                       params: dict[str, Any]) -> None:
    code = str(exc.title or "error").lower().replace(" ", "_")
    _send_json(resp, _error_body(code, str(exc.description or exc.title)), exc.status_code)


def _handle_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict[str, Any]) -> None:
    # A bug costs this request a 500 with an error record; the traceback goes to the log, not to the client.
    log.error("%s %s failed", req.method, req.path, exc_info=exc)
    _send_json(resp, _error_body("internal_error", f"edgevl could not handle this request: {type(exc).__name__}"),
               500)


def make_app(backend: Backend, settings: HttpSettings, token: str | None) -> falcon.App[Any, Any]:
    middleware: list[Guard | _Auth] = [Guard(settings), _Auth(token)]
    app = falcon.App(middleware=middleware)
    multipart = app.req_options.media_handlers[falcon.MEDIA_MULTIPART]
    assert isinstance(multipart, falcon.media.MultipartFormHandler)
    multipart.parse_options.max_body_part_count = 256
    app.add_error_handler(Exception, _handle_unexpected)
    app.add_error_handler(ApiError, _handle_api_error)
    app.add_error_handler(falcon.HTTPError, _handle_http_error)
    app.add_route("/", _Page())
    app.add_route("/healthz", _Health(backend))
    app.add_route("/metrics", _Metrics(backend))
    app.add_route("/v1/rules", _Rules(backend))
    app.add_route("/v1/status", _Status(backend))
    app.add_route("/v1/results", _Results(backend))
    app.add_route("/v1/results/{job_id}", Result(backend.recent, _send_json))
    app.add_route("/v1/results/{job_id}/image", ResultImage(backend.recent, backend.image_roots))
    app.add_route("/v1/ask", _Ask(backend, settings))
    return app
