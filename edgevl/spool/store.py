"""The durable job spool under ``state_dir/spool``: jobs kept from the moment they are taken until delivered.

Each step is an atomic rename or write, and delivery recognises its own earlier
output, so a ``kill -9`` at any instant followed by a restart ends every taken
image with exactly one result or one error record. Taking a folder's file is
``edgevl.spool.claim``; a job folder is ``edgevl.spool.job``.

The spool holds regular files only; a job folder whose description was lost
(a damaged disk) is not dropped: its image goes to ``failed/_unknown/``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
from pathlib import Path

from edgevl.errors import StateError
from edgevl.fsutil import atomic_write, candidate_names, fsync_dir, move_onto, place_new, reserve_new
from edgevl.names import NAME_MAX, display, name_max, safe_name
from edgevl.records import Source, is_error, new_job_id
from edgevl.spool.hand import Hand
from edgevl.spool.job import POISON_PREFIX, JobMeta, Reply, SpoolJob, is_output_of, record_bytes

log = logging.getLogger(__name__)

INCOMING = ".incoming-"
SET_ASIDE = ".poison-"  # jobs that stopped the daemon even when quarantined: kept, never touched again
UNKNOWN_RULE = "_unknown"  # a damaged job's rule (not a valid rule name, so it cannot collide with one)


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

    def accept(self, data: bytes, suffix: str, rule: str, source: Source, received_at: str,
               job_id: str | None = None, reply: Reply | None = None, meta_json: str | None = None) -> SpoolJob:
        """Take an image that arrived as bytes: durable (fsynced) when this returns.

        The job is assembled in a hidden folder and renamed into place, so the
        loop never sees half of it.
        """
        key = new_job_id()
        job_id = job_id or key
        meta = JobMeta(job_id=job_id, rule=rule, name=f"{job_id}{suffix}", received_at=received_at, source=source)
        if reply:
            meta["reply"] = reply
        if meta_json is not None:
            meta["meta_json"] = meta_json
        staging = self.root / f"{INCOMING}{key}"
        staging.mkdir()
        try:
            job = SpoolJob(staging, meta)
            atomic_write(job.image, data)
            job.write_meta()
            os.rename(staging, self.root / key)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(self.root)
        return SpoolJob(self.root / key, meta)

    def _entries(self) -> list[Path]:
        """The job folders, oldest first (hidden ones are being assembled, or set aside)."""
        return [e for e in sorted(self.root.iterdir()) if not e.name.startswith(".") and e.is_dir()]

    def load(self, key: str) -> SpoolJob:
        """The job ``key``; ``ValueError`` when its job.json is damaged, whatever the damage."""
        folder = self.root / key
        meta: JobMeta = json.loads((folder / "job.json").read_bytes())
        try:
            job = SpoolJob(folder, meta)
            _ = (job.job_id, job.rule, job.name, job.image, meta["received_at"], dict(meta["source"]))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"job.json lacks {exc}") from None
        return job

    def readable(self) -> list[SpoolJob]:
        """The jobs whose description can be read, as they are: nothing is recovered or changed (that is
        ``pending``'s, which runs only after the quarantine at start)."""
        jobs = []
        for entry in self._entries():
            with contextlib.suppress(OSError, ValueError):
                jobs.append(self.load(entry.name))
        return jobs

    def pending(self, device_id: str = "") -> list[SpoolJob]:
        """Claimed jobs not yet finished, oldest first. A damaged job comes with its error record."""
        jobs = []
        for entry in self._entries():
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
            job = self.load(entry.name)
        except FileNotFoundError:
            if not any(p.name.startswith("image") for p in entry.iterdir()):
                # Crashed between creating the folder and writing job.json: nothing was claimed.
                shutil.rmtree(entry, ignore_errors=True)
                return None
            return self._damaged(entry, "job.json is missing", device_id)
        except ValueError as exc:
            return self._damaged(entry, f"job.json is unreadable: {exc}", device_id)
        if not os.path.lexists(job.image) and job.record() is None:
            held = job.held()
            if held is not None and os.path.lexists(held):
                if stat.S_ISREG(os.lstat(held).st_mode):
                    with self.hand.holding(f"job:{job.key}") if self.hand else contextlib.nullcontext():
                        job.copy_in(held)
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
        job = SpoolJob(entry, JobMeta(job_id=entry.name, rule=UNKNOWN_RULE, name=entry.name + suffix,
                                      received_at="", source=Source(kind="spool")))
        job.write_meta()
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
            job.meta["name"] = job.key + Path(safe_name(job.name)).suffix
            job.write_meta()
            job.drop_placement()  # its outputs are named from its key now
        except (ValueError, FileNotFoundError):
            job = self._damaged(self.root / key, "unreadable when it was quarantined", device_id)
        held = job.held()
        if not os.path.lexists(job.image) and held is not None and os.path.lexists(held):
            kept = held.parent.parent / f"{POISON_PREFIX}{job.key}{held.suffix}"
            os.rename(held, kept)
            message += f"; the file is kept as {display(str(kept))[0]}"
        job.save_record(job.job(device_id).error(code, message))
        return job

    def set_aside(self, key: str) -> Path:
        """Hide a job that could not even be quarantined: kept for a person to look at, never touched again."""
        target = self.root / f"{SET_ASIDE}{key}"
        os.rename(self.root / key, target)
        fsync_dir(self.root)
        return target

    def place_image(self, job: SpoolJob, failed_job: bool, archive: Path | None, failed: Path) -> str | None:
        """Where the job's image is kept once delivered (None: deleted, or there is none), decided once with
        its name reserved, so that the record can say it before the image moves. Safe to repeat."""
        placed = job.placement()
        if placed is not None:
            return placed[0]
        image_file = None
        kept = failed if failed_job else archive
        if kept is not None and _is_regular(job.image):
            folder = kept / job.rule
            folder.mkdir(parents=True, exist_ok=True)
            stem, suffix = self._stem_suffix(job, folder)
            image_file = str(reserve_new(folder, candidate_names(stem, suffix)))
        job.save_placement(image_file)
        return image_file

    def finish(self, job: SpoolJob, results: Path, archive: Path | None, failed: Path) -> Path:
        """Deliver the job's image and record, then forget the job. Safe to repeat after a crash."""
        saved = job.record()
        if saved is None:
            raise RuntimeError(f"job {job.job_id} has no record")
        record = job.complete(saved).copy()
        image_file = self.place_image(job, is_error(record), archive, failed)
        record["image_file"] = image_file
        if os.path.lexists(job.image):
            if image_file is None:
                job.image.unlink()
            else:
                move_onto(job.image, Path(image_file))
        ours = is_output_of(job.job_id)
        data = record_bytes(record)
        if not is_error(record):
            folder = results / job.rule
            folder.mkdir(parents=True, exist_ok=True)
            stem, _ = self._stem_suffix(job, folder)
            delivered = place_new(folder, candidate_names(stem, ".json"), data, ours)
        else:
            folder = failed / job.rule
            folder.mkdir(parents=True, exist_ok=True)
            stem, suffix = self._stem_suffix(job, folder)
            # Beside its image, named after it: frame.jpg and frame.jpg.error.json.
            base = Path(image_file).name if image_file else stem + suffix
            delivered = place_new(folder, candidate_names(base, ".error.json"), data, ours)
        shutil.rmtree(job.dir)
        fsync_dir(self.root)
        return delivered

    @staticmethod
    def _stem_suffix(job: SpoolJob, folder: Path) -> tuple[str, str]:
        name = job.name
        limit = name_max(folder)
        if limit < NAME_MAX:  # a filesystem with shorter names than the spool assumed
            name = safe_name(name, limit)
        return Path(name).stem, Path(name).suffix

    def count(self) -> int:
        return len(self._entries())


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False
