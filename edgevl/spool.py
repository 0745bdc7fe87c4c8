"""The durable job spool under ``state_dir/spool``.

A job is one folder, ``spool/<key>/``, holding ``job.json`` (where the image
came from), the image itself, and once answered ``record.json``.  The key sorts
by arrival (the spool's FIFO order); the job id in the records is the key, or
the id an MQTT sender gave its image.  Each step is an atomic rename or write,
and delivery recognises its own earlier output, so a ``kill -9`` at any instant
followed by a restart ends every claimed image with exactly one result or one
error record.

The spool holds regular files only: a folder entry is checked when it is taken
(``lstat``, and again on the renamed entry, so nothing can be swapped in
between), a symbolic link a rule accepts is replaced by a copy of its target,
and a file over the rule's ``max_bytes`` is never read: it gets its error
record at once.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevl.errors import InputError, StateError
from edgevl.fsutil import (
    atomic_write,
    candidate_names,
    copy_regular,
    fsync_dir,
    json_bytes,
    kind_of,
    move_new,
    place_new,
    read_regular,
)
from edgevl.hand import Hand
from edgevl.names import display, name_max, safe_name
from edgevl.records import Job, is_error, new_job_id

log = logging.getLogger(__name__)

CLAIM_DIR = ".edgevl-claim"  # beside the inbox, for inboxes on another filesystem
INCOMING = ".incoming-"
SET_ASIDE = ".poison-"  # jobs that stopped the daemon even when quarantined: kept, never touched again
UNKNOWN_RULE = "_unknown"  # a damaged job's rule (not a valid rule name, so it cannot collide with one)


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
        """The job's identity for its record; ``source.meta`` is added at delivery (see ``complete``)."""
        return Job(rule=self.rule, source=dict(self.meta["source"]), device_id=device_id, job_id=self.job_id,
                   received_at=str(self.meta["received_at"]))

    def complete(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` with the sender's ``meta``, which is kept as JSON text until here: it never
        travels to the worker."""
        text = self.meta.get("meta_json")
        if text is None:
            return record
        source = dict(record.get("source") or {})
        source["meta"] = json.loads(text)
        return {**record, "source": source}

    def record(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.record_path.read_bytes())
            return data
        except FileNotFoundError:
            return None
        except ValueError as exc:  # torn by a power cut before its fsync: answer the image again
            log.warning("job %s: unreadable record.json (%s); answering again", self.key, exc)
            self.record_path.unlink(missing_ok=True)
            return None

    def save_record(self, record: dict[str, Any]) -> None:
        atomic_write(self.record_path, json_bytes(record))

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


def _is_job_output(job_id: str) -> Any:
    def check(path: Path) -> bool:
        try:
            return bool(json.loads(path.read_bytes()).get("job_id") == job_id)
        except (OSError, ValueError, AttributeError):
            return False

    return check


def folder_source(path: Path) -> dict[str, Any]:
    """``source`` of a folder image: its path as text, and its bytes when they are not UTF-8."""
    shown, raw = display(str(path))
    source: dict[str, Any] = {"kind": "folder", "path": shown}
    if raw is not None:
        source["path_base64"] = raw
    return source


class Spool:
    def __init__(self, root: Path, hand: Hand | None = None) -> None:
        self.root = root
        # Recovery steps (a copy interrupted by a crash) count as in hand, like every other step with an input.
        self.hand = hand
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f"{INCOMING}probe"
            probe.mkdir(exist_ok=True)
            probe.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not root.is_dir():
                raise StateError(f"the spool {root} cannot be used: {exc.strerror or exc} (state_dir)") from None
            # Full: files wait in their folders until there is room; not a reason to stop.
            log.warning("the spool %s is full: nothing can be taken until there is room", root)
        for entry in root.glob(INCOMING + "*"):
            # Written by a daemon that died before the rename: never acknowledged, so redelivered.
            shutil.rmtree(entry, ignore_errors=True)

    def accept(self, data: bytes, suffix: str, rule: str, source: dict[str, Any], received_at: str,
               job_id: str | None = None, reply: dict[str, Any] | None = None,
               meta_json: str | None = None) -> SpoolJob:
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
        if meta_json is not None:
            meta["meta_json"] = meta_json
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

    def claim(self, source: Path, rule: str, received_at: str, max_bytes: int, follow_symlinks: bool = False,
              device_id: str = "", quarantine: tuple[str, str] | None = None,
              job_id: str | None = None) -> SpoolJob | None:
        """Take ``source`` by renaming it into the spool; None if it vanished or another daemon took it.

        ``InputError`` when it is not a regular file, or a link to one that the rule accepts: it is left
        where it is. ``quarantine`` (code, message) takes the entry as it is, without looking into it,
        with that error record and a name made from the job key alone.
        """
        try:
            st = os.lstat(source)
        except FileNotFoundError:
            return None
        problem: InputError | None = None
        link_data: bytes | None = None
        if quarantine is not None:
            problem = InputError(quarantine[1], quarantine[0])
        elif stat.S_ISLNK(st.st_mode):
            if not follow_symlinks:
                raise InputError(f"{source.name} is a symbolic link (the rule's follow_symlinks is off)",
                                 "not_a_regular_file")
            # Read through the link before it moves: a relative target means something else elsewhere.
            try:
                link_data = read_regular(source, max_bytes, follow_symlinks=True)
            except InputError as exc:
                if exc.code != "file_too_large":
                    raise  # a link to a device, FIFO or socket is never taken
                problem = exc
            except FileNotFoundError:
                raise InputError(f"{source.name} is a link to nothing", "not_a_regular_file") from None
        elif not stat.S_ISREG(st.st_mode):
            raise InputError(f"{source.name} is a {kind_of(st.st_mode)}, not a regular file", "not_a_regular_file")
        elif st.st_size > max_bytes:
            problem = InputError(f"the file has {st.st_size} bytes, over the rule's max_bytes of {max_bytes}; "
                                 "it was not read", "file_too_large")
        job_id = job_id or new_job_id()
        name = safe_name(source.name)
        if quarantine is not None:
            name = job_id + Path(name).suffix
        meta = {"job_id": job_id, "rule": rule, "name": name, "received_at": received_at,
                "source": folder_source(source)}
        job = SpoolJob(self.root / job_id, meta)
        job.dir.mkdir()
        try:
            atomic_write(job.dir / "job.json", json_bytes(meta))
            try:
                os.rename(source, job.image)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._claim_across_filesystems(source, job, link_data)
            else:
                if link_data is not None:
                    atomic_write(job.image, link_data)  # the target's bytes replace the link
            fsync_dir(job.dir)
        except FileNotFoundError:
            shutil.rmtree(job.dir, ignore_errors=True)
            log.info("%s is gone before it could be taken (another reader?)", display(str(source))[0],
                     extra={"EDGEVL_RULE": rule})
            return None
        except BaseException:
            if not os.path.lexists(job.image):
                shutil.rmtree(job.dir, ignore_errors=True)
            raise
        if problem is None and not (os.path.lexists(job.image) and stat.S_ISREG(os.lstat(job.image).st_mode)):
            # Swapped between the check and the rename: taken, never read.
            problem = InputError(f"{job.name} is no regular file", "not_a_regular_file")
        if problem is not None:
            job.save_record(job.job(device_id).error(problem.code, problem.message))
        return job

    def _claim_across_filesystems(self, source: Path, job: SpoolJob, link_data: bytes | None) -> None:
        # The atomic step happens on the inbox's own filesystem; the copy into
        # the spool can then be repeated after a crash (see pending()).
        hold = source.parent / CLAIM_DIR
        hold.mkdir(exist_ok=True)
        held = hold / f"{job.key}{Path(job.name).suffix.lower()}"
        os.rename(source, held)
        try:
            if link_data is not None:
                atomic_write(job.image, link_data)
                held.unlink()
            elif stat.S_ISREG(os.lstat(held).st_mode):
                # Streamed, holes kept: a file over max_bytes is copied but never read into memory.
                self._copy_in(held, job)
            else:
                held.unlink()  # swapped in since the check: nothing to copy (its error record says so)
        except OSError:
            # A full spool: the file goes back where it was, so that it is taken again later.
            try:
                os.link(held, source)
                held.unlink()
            except OSError as exc:
                log.error("cannot put %s back: %s; it waits in %s and is taken when the spool has room",
                          display(str(source))[0], exc.strerror or exc, hold)
                raise
            shutil.rmtree(job.dir, ignore_errors=True)
            raise

    @staticmethod
    def _copy_in(held: Path, job: SpoolJob) -> None:
        tmp = job.dir / ".copy.part"
        tmp.unlink(missing_ok=True)
        copy_regular(held, tmp)
        os.replace(tmp, job.image)
        held.unlink()

    def load(self, key: str) -> SpoolJob:
        folder = self.root / key
        return SpoolJob(folder, json.loads((folder / "job.json").read_bytes()))

    def pending(self, device_id: str = "") -> list[SpoolJob]:
        """Claimed jobs not yet finished, oldest first. A damaged job comes with its error record."""
        jobs = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                job = self._recover(entry, device_id)
            except OSError as exc:
                log.error("cannot read spool job %s: %s; trying again later", entry.name, exc.strerror or exc)
                continue
            if job is not None:
                jobs.append(job)
        return jobs

    def _recover(self, entry: Path, device_id: str) -> SpoolJob | None:
        try:
            meta = json.loads((entry / "job.json").read_bytes())
            if not isinstance(meta, dict):
                raise ValueError("not an object")
            job = SpoolJob(entry, meta)
            _ = (job.job_id, job.rule, job.name, job.image, meta["received_at"], dict(meta["source"]))
        except FileNotFoundError:
            if not any(p.name.startswith("image") for p in entry.iterdir()):
                # Crashed between creating the folder and writing job.json: nothing was claimed.
                shutil.rmtree(entry, ignore_errors=True)
                return None
            return self._damaged(entry, "job.json is missing", device_id)
        except (ValueError, KeyError, TypeError) as exc:
            return self._damaged(entry, f"job.json is unreadable: {exc}", device_id)
        if not os.path.lexists(job.image) and job.record() is None:
            held = self._held(job)
            if held is not None and os.path.lexists(held):
                if stat.S_ISREG(os.lstat(held).st_mode):
                    with self.hand.holding(f"job:{job.key}") if self.hand else contextlib.nullcontext():
                        self._copy_in(held, job)
                else:  # a link being taken: where it pointed is not known for sure any more
                    held.unlink()
                    job.save_record(job.job(device_id).error(
                        "file_unreadable", "edgevl stopped while taking this link; link the file again"))
            else:
                # Crashed before the rename: the image is still in its inbox.
                shutil.rmtree(entry, ignore_errors=True)
                return None
        return job

    def _damaged(self, entry: Path, why: str, device_id: str) -> SpoolJob:
        """A job folder whose description is lost: its image goes to failed/_unknown/ with an error record."""
        images = sorted(p for p in entry.iterdir() if p.name.startswith("image"))
        suffix = images[0].suffix if images else ""
        meta = {"job_id": entry.name, "rule": UNKNOWN_RULE, "name": entry.name + suffix,
                "received_at": "", "source": {"kind": "spool"}}
        atomic_write(entry / "job.json", json_bytes(meta))
        job = SpoolJob(entry, meta)
        job.save_record(job.job(device_id).error("spool_damaged", f"the spool job {entry.name} was damaged: {why}"))
        log.error("spool job %s was damaged (%s); its image goes to failed/%s/", entry.name, why, UNKNOWN_RULE)
        return job

    def quarantine(self, key: str, device_id: str, code: str, message: str) -> SpoolJob:
        """Give the job ``key`` its error record and a name made from its key alone, whatever it held.

        A file still waiting to be copied in from another filesystem is not copied (the copy may be what
        stopped edgevl): it is renamed, on its own filesystem, to a hidden name the watcher never takes.
        """
        try:
            job = self.load(key)
            meta = {**job.meta, "name": job.key + Path(safe_name(job.name)).suffix}
            atomic_write(job.dir / "job.json", json_bytes(meta))
            job = SpoolJob(job.dir, meta)
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            job = self._damaged(self.root / key, "unreadable when it was quarantined", device_id)
        held = self._held(job)
        if not os.path.lexists(job.image) and held is not None and os.path.lexists(held):
            kept = held.parent.parent / f".edgevl-poison-{job.key}{held.suffix}"
            os.rename(held, kept)
            message += f"; the file is kept as {display(str(kept))[0]}"
        job.save_record(job.job(device_id).error(code, message))
        return job

    @staticmethod
    def _held(job: SpoolJob) -> Path | None:
        """Where a claim across filesystems keeps the file until it is copied into the spool."""
        path = job.meta.get("source", {}).get("path")
        if not path:
            return None
        raw = job.meta["source"].get("path_base64")
        origin = Path(os.fsdecode(base64.b64decode(raw))) if raw else Path(path)
        return origin.parent / CLAIM_DIR / f"{job.key}{Path(job.name).suffix.lower()}"

    def set_aside(self, key: str) -> Path:
        """Hide a job that could not even be quarantined: kept for a person to look at, never touched again."""
        target = self.root / f"{SET_ASIDE}{key}"
        os.rename(self.root / key, target)
        fsync_dir(self.root)
        return target

    def finish(self, job: SpoolJob, results: Path, archive: Path | None, failed: Path) -> Path:
        """Deliver the job's record and image, then forget the job. Safe to repeat after a crash."""
        record = job.record()
        if record is None:
            raise RuntimeError(f"job {job.job_id} has no record")
        record = job.complete(record)
        ours = _is_job_output(job.job_id)
        data = json_bytes(record)
        if not is_error(record):
            folder = results / job.rule
            folder.mkdir(parents=True, exist_ok=True)
            stem, suffix = self._stem_suffix(job, folder)
            delivered = place_new(folder, candidate_names(stem, ".json"), data, ours)
            if os.path.lexists(job.image):
                if archive is None:
                    job.image.unlink()
                else:
                    self._move_image(job, archive / job.rule, candidate_names(stem, suffix))
        else:
            folder = failed / job.rule
            folder.mkdir(parents=True, exist_ok=True)
            stem, suffix = self._stem_suffix(job, folder)
            delivered = place_new(folder, candidate_names(stem, suffix + ".error.json"), data, ours)
            if os.path.lexists(job.image):
                image_name = delivered.name[: -len(".error.json")]
                self._move_image(job, folder, lambda n: image_name if n == 0 else f"{stem}.x{n}{suffix}")
        shutil.rmtree(job.dir)
        fsync_dir(self.root)
        return delivered

    @staticmethod
    def _stem_suffix(job: SpoolJob, folder: Path) -> tuple[str, str]:
        name = job.name
        limit = name_max(folder)
        if limit < 255:  # a filesystem with shorter names than the spool assumed
            name = safe_name(name, limit)
        return Path(name).stem, Path(name).suffix

    @staticmethod
    def _move_image(job: SpoolJob, folder: Path, names: Any) -> None:
        try:
            move_new(job.image, folder, names)
        except InputError:
            # Not a regular file and on another filesystem: there is nothing to copy.
            job.image.unlink()

    def count(self) -> int:
        return sum(1 for e in self.root.iterdir() if e.is_dir() and not e.name.startswith("."))
