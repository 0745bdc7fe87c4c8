"""A record and its image, by job id: the evidence behind an answer.

``GET /v1/results/{job_id}`` serves the record (among the latest ``recent_results``),
``GET /v1/results/{job_id}/image`` the image it names in ``image_file``. Only files
inside the archive and failed folders are served, opened without following links:
a record can never make the API read anything else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import falcon

from edgevl.errors import InputError
from edgevl.fsutil import open_regular
from edgevl.http.guard import ApiError
from edgevl.http.jobs import RecentRecords
from edgevl.records import Record

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                 ".bmp": "image/bmp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff",
                 ".pdf": "application/pdf"}


def _record(recent: RecentRecords, job_id: str) -> Record:
    record = recent.find(job_id)
    if record is None:
        raise ApiError(404, "not_found", f"no record of job {job_id!r} among the latest results "
                                         "(http.recent_results)")
    return record


class Result:
    def __init__(self, recent: RecentRecords, send: Callable[[falcon.Response, object], None]) -> None:
        self.recent = recent
        self.send = send

    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        self.send(resp, _record(self.recent, job_id))


class ResultImage:
    def __init__(self, recent: RecentRecords, roots: Callable[[], list[Path]]) -> None:
        self.recent = recent
        self.roots = roots

    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        record = _record(self.recent, job_id)
        image_file = record.get("image_file")
        if not image_file:
            why = ("it was deleted (folders.archive is off, or it was no regular file)" if "image_file" in record
                   else "edgevl did not keep it")
            raise ApiError(404, "image_not_kept", f"the image of job {job_id!r} is not kept: {why}")
        path = Path(image_file)
        roots = [r.resolve() for r in self.roots()]
        if not any(path.parent.resolve().is_relative_to(root) for root in roots):
            raise ApiError(404, "image_not_kept", "the record names a file outside the archive and failed folders")
        try:
            fd, st = open_regular(path)
        except (OSError, InputError) as exc:
            why = exc.message if isinstance(exc, InputError) else exc.strerror or str(exc)
            raise ApiError(404, "image_not_kept", f"the image of job {job_id!r} is gone ({why}; retention may "
                                                  "have deleted it)") from None
        resp.content_type = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        # Percent-encoded: a file name may hold quotes or line breaks, which must not reach a header raw.
        resp.set_header("Content-Disposition", f"inline; filename*=UTF-8''{quote(path.name)}")
        resp.set_stream(os.fdopen(fd, "rb"), st.st_size)
