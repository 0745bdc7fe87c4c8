"""The result and error records: the contract every output of edgevl uses."""

from __future__ import annotations

import datetime as dt
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Literal

RESULT_SCHEMA = "edgevl.result/1"
ERROR_SCHEMA = "edgevl.error/1"

SourceKind = Literal["cli", "folder", "mqtt", "http"]


def is_error(record: dict[str, Any]) -> bool:
    """Whether ``record`` is an error record: the one test every output uses."""
    return record.get("schema") != RESULT_SCHEMA


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_job_id() -> str:
    """Unique across processes and appliances, and sortable by creation time (the spool's FIFO order)."""
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


def default_device_id() -> str:
    return socket.gethostname()


@dataclass
class Job:
    """Identity of one image's job, shared by its result or error record."""

    rule: str
    source: dict[str, Any]
    device_id: str = field(default_factory=default_device_id)
    job_id: str = field(default_factory=new_job_id)
    received_at: str = field(default_factory=now_rfc3339)

    def _base(self, schema: str) -> dict[str, Any]:
        return {
            "schema": schema,
            "job_id": self.job_id,
            "device_id": self.device_id,
            "rule": self.rule,
            "source": dict(self.source),
            "received_at": self.received_at,
            "finished_at": now_rfc3339(),
        }

    def result(self, image: dict[str, Any], model: dict[str, str], answers: dict[str, Any],
               timings_ms: dict[str, float]) -> dict[str, Any]:
        record = self._base(RESULT_SCHEMA)
        record.update(
            image=image,
            model=model,
            answers=answers,
            timings_ms={k: round(v, 1) for k, v in timings_ms.items()},
        )
        return record

    def error(self, code: str, message: str, image: dict[str, Any] | None = None,
              model: dict[str, str] | None = None) -> dict[str, Any]:
        record = self._base(ERROR_SCHEMA)
        if image is not None:
            record["image"] = image
        if model is not None:
            record["model"] = model
        record["error"] = {"code": code, "message": message}
        return record
