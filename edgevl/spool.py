"""The durable job spool under ``state_dir/spool``.

A job is one folder, ``spool/<key>/``, holding ``job.json`` (where the image
came from), the image itself, and once answered ``record.json``.  The key sorts
by arrival (the spool's FIFO order); the job id in the records is the key, or
the id an MQTT sender gave its image.  Each step is
an atomic rename or write, and delivery recognises its own earlier output, so a
``kill -9`` at any instant followed by a restart ends every claimed image with
exactly one result or one error record.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevl.fsutil import atomic_write, candidate_names, fsync_dir, json_bytes, move_new, place_new
from edgevl.records import RESULT_SCHEMA, Job, new_job_id

log = logging.getLogger(__name__)

CLAIM_DIR = ".edgevl-claim"  # beside the inbox, for inboxes on another filesystem


@dataclass
class SpoolJob:
    dir: Path
    meta: dict[str, Any]

    @property
    def key(self) -> str:
        return self.dir.name

    @property
    def job_id(self) -> str:
        return str(self.meta["job_id"])

    @property
    def rule(self) -> str:
        return str(self.meta["rule"])

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def image(self) -> Path:
        return self.dir / ("image" + Path(self.name).suffix.lower())

    @property
    def record_path(self) -> Path:
        return self.dir / "record.json"

    def job(self, device_id: str) -> Job:
        return Job(rule=self.rule, source=dict(self.meta["source"]), device_id=device_id, job_id=self.job_id,
                   received_at=str(self.meta["received_at"]))

    def record(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.record_path.read_bytes())
            return data
        except FileNotFoundError:
            return None

    def save_record(self, record: dict[str, Any]) -> None:
        atomic_write(self.record_path, json_bytes(record))

    def worker_failures(self) -> list[str]:
        """Codes of the worker deaths this job was present at; kept across daemon restarts."""
        try:
            data: list[str] = json.loads((self.dir / "failures.json").read_bytes())["worker"]
            return data
        except (FileNotFoundError, ValueError, KeyError):
            return []

    def add_worker_failure(self, code: str) -> list[str]:
        failures = [*self.worker_failures(), code]
        atomic_write(self.dir / "failures.json", json_bytes({"worker": failures}))
        return failures


def _is_job_output(job_id: str) -> Any:
    def check(path: Path) -> bool:
        try:
            return bool(json.loads(path.read_bytes()).get("job_id") == job_id)
        except (OSError, ValueError, AttributeError):
            return False

    return check


INCOMING = ".incoming-"


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for entry in root.glob(INCOMING + "*"):
            # Written by a daemon that died before the rename: never acknowledged, so redelivered.
            shutil.rmtree(entry, ignore_errors=True)

    def accept(self, data: bytes, suffix: str, rule: str, source: dict[str, Any], received_at: str,
               job_id: str | None = None, reply: dict[str, Any] | None = None) -> SpoolJob:
        """Take an image that arrived as bytes: durable (fsynced) when this returns.

        The job is assembled in a hidden folder and renamed into place, so the
        loop never sees half of it.
        """
        key = new_job_id()
        job_id = job_id or key
        meta: dict[str, Any] = {"job_id": job_id, "rule": rule, "name": f"{job_id}{suffix}",
                                "received_at": received_at, "source": source}
        if reply:
            meta["reply"] = reply
        staging = self.root / f"{INCOMING}{key}"
        staging.mkdir()
        try:
            job = SpoolJob(staging, meta)
            atomic_write(job.image, data)
            atomic_write(staging / "job.json", json_bytes(meta))
            os.rename(staging, self.root / key)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(self.root)
        return SpoolJob(self.root / key, meta)

    def claim(self, source: Path, rule: str, received_at: str) -> SpoolJob | None:
        """Take ``source`` by renaming it into the spool; None if it vanished or another daemon took it."""
        job_id = new_job_id()
        meta = {"job_id": job_id, "rule": rule, "name": source.name, "received_at": received_at,
                "source": {"kind": "folder", "path": str(source)}}
        job = SpoolJob(self.root / job_id, meta)
        job.dir.mkdir()
        try:
            atomic_write(job.dir / "job.json", json_bytes(meta))
            try:
                os.rename(source, job.image)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._claim_across_filesystems(source, job)
            fsync_dir(job.dir)
        except FileNotFoundError:
            shutil.rmtree(job.dir, ignore_errors=True)
            log.info("%s is gone before it could be taken (another reader?)", source,
                     extra={"EDGEVL_IMAGE": str(source), "EDGEVL_RULE": rule})
            return None
        except BaseException:
            if not job.image.exists():
                shutil.rmtree(job.dir, ignore_errors=True)
            raise
        return job

    def _claim_across_filesystems(self, source: Path, job: SpoolJob) -> None:
        # The atomic step happens on the inbox's own filesystem; the copy into
        # the spool can then be repeated after a crash (see recover()).
        hold = source.parent / CLAIM_DIR
        hold.mkdir(exist_ok=True)
        held = hold / f"{job.key}{source.suffix.lower()}"
        os.rename(source, held)
        self._copy_in(held, job)

    @staticmethod
    def _copy_in(held: Path, job: SpoolJob) -> None:
        atomic_write(job.image, held.read_bytes())
        held.unlink()

    def load(self, key: str) -> SpoolJob:
        folder = self.root / key
        return SpoolJob(folder, json.loads((folder / "job.json").read_bytes()))

    def pending(self) -> list[SpoolJob]:
        """Claimed jobs not yet finished, oldest first."""
        jobs = []
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            try:
                meta = json.loads((entry / "job.json").read_bytes())
            except (OSError, ValueError):
                meta = None
            if meta is None:
                # Crashed between creating the folder and writing job.json: nothing was claimed.
                shutil.rmtree(entry, ignore_errors=True)
                continue
            job = SpoolJob(entry, meta)
            if not job.image.exists() and job.record() is None:
                path = meta["source"].get("path")
                held = Path(path).parent / CLAIM_DIR / f"{job.key}{Path(job.name).suffix.lower()}" if path else None
                if held is not None and held.exists():
                    self._copy_in(held, job)
                else:
                    # Crashed before the rename: the image is still in its inbox.
                    shutil.rmtree(entry, ignore_errors=True)
                    continue
            jobs.append(job)
        return jobs

    def finish(self, job: SpoolJob, results: Path, archive: Path | None, failed: Path) -> Path:
        """Deliver the job's record and image, then forget the job. Safe to repeat after a crash."""
        record = job.record()
        if record is None:
            raise RuntimeError(f"job {job.job_id} has no record")
        stem, suffix = Path(job.name).stem, Path(job.name).suffix
        ours = _is_job_output(job.job_id)
        data = json_bytes(record)
        if record["schema"] == RESULT_SCHEMA:
            delivered = place_new(results / job.rule, candidate_names(stem, ".json"), data, ours)
            if job.image.exists():
                if archive is None:
                    job.image.unlink()
                else:
                    move_new(job.image, archive / job.rule, candidate_names(stem, suffix))
        else:
            folder = failed / job.rule
            delivered = place_new(folder, candidate_names(stem, suffix + ".error.json"), data, ours)
            if job.image.exists():
                image_name = delivered.name[: -len(".error.json")]
                move_new(job.image, folder, lambda n: image_name if n == 0 else f"{stem}.x{n}{suffix}")
        shutil.rmtree(job.dir)
        fsync_dir(self.root)
        return delivered

    def count(self) -> int:
        return sum(1 for e in self.root.iterdir() if e.is_dir() and not e.name.startswith("."))
