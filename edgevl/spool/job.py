"""One job of the spool: a folder ``spool/<key>/`` with ``job.json``, the image, and once answered ``record.json``.

The key sorts by arrival (the spool's FIFO order); the job id in the records is
the key, or the id an MQTT sender gave its image.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from edgevl.fsutil import atomic_write, copy_regular, json_bytes
from edgevl.names import display
from edgevl.records import Job, Record, Source, to_json

log = logging.getLogger(__name__)

CLAIM_DIR = ".edgevl-claim"  # beside an inbox on another filesystem than the spool
# A hidden name beside its inbox for a file that stopped edgevl: the watcher never takes it again.
POISON_PREFIX = ".edgevl-poison-"


class Reply(TypedDict):
    """Where an MQTT v5 request wants its record: the response topic and its correlation data (base64)."""

    topic: str
    correlation: str | None


class JobMeta(TypedDict):
    """``job.json``: where the image came from."""

    job_id: str
    rule: str
    name: str  # the name its outputs are derived from (safe; see edgevl.names)
    received_at: str
    source: Source
    reply: NotRequired[Reply]
    meta_json: NotRequired[str]  # an MQTT sender's meta, as JSON text until it is written into the record


@dataclass
class SpoolJob:
    dir: Path
    meta: JobMeta

    @property
    def key(self) -> str:
        return self.dir.name

    @property
    def job_id(self) -> str:
        return self.meta["job_id"]

    @property
    def rule(self) -> str:
        return self.meta["rule"]

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def image(self) -> Path:
        return self.dir / ("image" + Path(self.name).suffix.lower())

    @property
    def record_path(self) -> Path:
        return self.dir / "record.json"

    def job(self, device_id: str) -> Job:
        """The job's identity for its record; ``source.meta`` is added at delivery (see ``complete``)."""
        return Job(rule=self.rule, source=Source(**self.meta["source"]), device_id=device_id, job_id=self.job_id,
                   received_at=self.meta["received_at"])

    def complete(self, record: Record) -> Record:
        """``record`` with the sender's ``meta``, which is kept as JSON text until here: it never
        travels to the worker."""
        text = self.meta.get("meta_json")
        if text is None:
            return record
        completed = record.copy()
        completed["source"] = Source(**record["source"], meta=json.loads(text))
        return completed

    def record(self) -> Record | None:
        try:
            data: Record = json.loads(self.record_path.read_bytes())
            return data
        except FileNotFoundError:
            return None
        except ValueError as exc:  # torn by a power cut before its fsync: answer the image again
            log.warning("job %s: unreadable record.json (%s); answering again", self.key, exc)
            self.record_path.unlink(missing_ok=True)
            return None

    def save_record(self, record: Record) -> None:
        atomic_write(self.record_path, record_bytes(record))

    def save_alarm_image(self, jpeg: bytes) -> None:
        atomic_write(self.dir / "alarm.jpg", jpeg)

    def alarm_image(self) -> bytes | None:
        try:
            return (self.dir / "alarm.jpg").read_bytes()
        except FileNotFoundError:
            return None

    def placement(self) -> tuple[str | None] | None:
        """Where the image goes once delivered, if that was decided: (path,), or (None,) for nowhere."""
        try:
            return (json.loads((self.dir / "placement.json").read_bytes())["image_file"],)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):  # torn before its fsync: decided again
            return None

    def save_placement(self, image_file: str | None) -> None:
        atomic_write(self.dir / "placement.json", json_bytes({"image_file": image_file}))

    def drop_placement(self) -> None:
        """Forget where the image was to go while it is still here, freeing the name it reserved."""
        placed = self.placement()
        if placed is None or not os.path.lexists(self.image):
            return  # nothing decided, or the image is already there: that place stands
        if placed[0] is not None:
            reserved = Path(placed[0])
            with contextlib.suppress(OSError):
                if reserved.lstat().st_size == 0:  # still the empty reservation, not an image
                    reserved.unlink()
        (self.dir / "placement.json").unlink(missing_ok=True)

    @property
    def published(self) -> bool:
        """Its MQTT messages went to the outbox: a retried delivery does not publish them again."""
        return (self.dir / "published").exists()

    def mark_published(self) -> None:
        atomic_write(self.dir / "published", b"")

    def worker_failures(self) -> list[str]:
        """Codes of the worker deaths this job was present at; kept across daemon restarts."""
        try:
            data: list[str] = json.loads((self.dir / "failures.json").read_bytes())["worker"]
            return data
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return []

    def add_worker_failure(self, code: str) -> list[str]:
        failures = [*self.worker_failures(), code]
        atomic_write(self.dir / "failures.json", json_bytes({"worker": failures}))
        return failures

    def held(self) -> Path | None:
        """Where a claim across filesystems keeps the file until it is copied into the spool."""
        source = self.meta["source"]
        if "path" not in source:
            return None
        raw = source.get("path_base64")
        origin = Path(os.fsdecode(base64.b64decode(raw))) if raw else Path(source["path"])
        return origin.parent / CLAIM_DIR / f"{self.key}{Path(self.name).suffix.lower()}"

    def copy_in(self, held: Path) -> None:
        """Copy the file held beside its inbox into the job (streamed, holes kept), then let it go."""
        tmp = self.dir / ".copy.part"
        tmp.unlink(missing_ok=True)
        copy_regular(held, tmp)
        os.replace(tmp, self.image)
        held.unlink()

    def write_meta(self) -> None:
        atomic_write(self.dir / "job.json", json_bytes(dict(self.meta)))


def record_bytes(record: Record) -> bytes:
    # backslashreplace: a lone surrogate (a file name's undecodable byte that slipped
    # through) becomes a JSON escape instead of an exception.
    return (to_json(record, indent=2) + "\n").encode("utf-8", "backslashreplace")


def is_output_of(job_id: str) -> Any:
    """A test for ``place_new``: is this file the output of ``job_id`` (written before a crash)?"""

    def check(path: Path) -> bool:
        try:
            return bool(json.loads(path.read_bytes()).get("job_id") == job_id)
        except (OSError, ValueError, AttributeError):
            return False

    return check


def folder_source(path: Path) -> Source:
    """``source`` of a folder image: its path as text, and its bytes when they are not UTF-8."""
    shown, raw = display(str(path))
    source = Source(kind="folder", path=shown)
    if raw is not None:
        source["path_base64"] = raw
    return source
