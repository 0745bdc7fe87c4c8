"""Taking a file from a watched folder into the spool: one atomic rename, regular files only.

The entry is checked when it is taken (``lstat``, and again on the renamed
entry, so nothing can be swapped in between); a symbolic link a rule accepts is
replaced by a copy of its target; a file over the rule's ``max_bytes`` is never
read: it gets its error record at once. An inbox on another filesystem is
claimed by a rename into its own ``.edgevl-claim/`` folder and then copied in;
when the spool is full the file goes back under its own name.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from pathlib import Path

from edgevl.errors import InputError
from edgevl.fsutil import atomic_write, fsync_dir, kind_of, read_regular
from edgevl.names import display, safe_name
from edgevl.records import new_job_id
from edgevl.spool.job import CLAIM_DIR, JobMeta, SpoolJob, folder_source
from edgevl.spool.store import Spool

log = logging.getLogger(__name__)


def _look(source: Path, max_bytes: int, follow_symlinks: bool) -> tuple[InputError | None, bytes | None]:
    """(the problem that makes it an error record at once, the bytes of an accepted link's target).

    ``InputError`` for what is never taken: it stays where it is.
    """
    st = os.lstat(source)
    if stat.S_ISLNK(st.st_mode):
        if not follow_symlinks:
            raise InputError(f"{source.name} is a symbolic link (the rule's follow_symlinks is off)",
                             "not_a_regular_file")
        # Read through the link before it moves: a relative target means something else elsewhere.
        try:
            return None, read_regular(source, max_bytes, follow_symlinks=True)
        except InputError as exc:
            if exc.code != "file_too_large":
                raise  # a link to a device, FIFO or socket is never taken
            return exc, None
        except FileNotFoundError:
            raise InputError(f"{source.name} is a link to nothing", "not_a_regular_file") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{source.name} is a {kind_of(st.st_mode)}, not a regular file", "not_a_regular_file")
    if st.st_size > max_bytes:
        return InputError(f"the file has {st.st_size} bytes, over the rule's max_bytes of {max_bytes}; "
                          "it was not read", "file_too_large"), None
    return None, None


def claim(spool: Spool, source: Path, rule: str, received_at: str, max_bytes: int, follow_symlinks: bool = False,
          device_id: str = "", quarantine: tuple[str, str] | None = None,
          job_id: str | None = None) -> SpoolJob | None:
    """Take ``source`` by renaming it into the spool; None if it vanished or another daemon took it.

    ``InputError`` when it is not a regular file, or a link to one that the rule accepts: it is left
    where it is. ``quarantine`` (code, message) takes the entry as it is, without looking into it,
    with that error record and a name made from the job key alone.
    """
    try:
        if quarantine is None:
            problem, link_data = _look(source, max_bytes, follow_symlinks)
        else:
            os.lstat(source)
            problem, link_data = InputError(quarantine[1], quarantine[0]), None
    except FileNotFoundError:
        return None
    job_id = job_id or new_job_id()
    name = safe_name(source.name)
    if quarantine is not None:
        name = job_id + Path(name).suffix
    job = SpoolJob(spool.root / job_id, JobMeta(job_id=job_id, rule=rule, name=name, received_at=received_at,
                                                source=folder_source(source)))
    job.dir.mkdir()
    try:
        job.write_meta()
        try:
            os.rename(source, job.image)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _across_filesystems(source, job, link_data)
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


def _across_filesystems(source: Path, job: SpoolJob, link_data: bytes | None) -> None:
    # The atomic step happens on the inbox's own filesystem; the copy into
    # the spool can then be repeated after a crash (see Spool.pending).
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
            job.copy_in(held)
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
