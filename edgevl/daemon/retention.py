"""Keeping the output folders from filling the disk over months of unattended running.

The results, archive and failed folders are each kept within a maximum age and a
maximum size (the oldest files go first), and the archive's filesystem above a
free-space floor (the oldest archived images go first). A sweep runs in a thread
of its own every ``retention.interval`` seconds, so that a folder of a million
files never holds up the loop. It deletes only regular files it finds under the
three folders, never under the state directory (the spool and the MQTT outbox live
there) or a watched folder, and never a file whose name starts with a dot: those
are records and images being written.
"""

from __future__ import annotations

import heapq
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from edgevl.config import FolderRetention, FolderSettings, RetentionSettings

log = logging.getLogger(__name__)

KINDS = ("archive", "results", "failed")
_DAY = 86400.0

File = tuple[float, int, str]  # (mtime, size, path)


@dataclass
class FolderCounts:
    deleted_files: int = 0
    deleted_bytes: int = 0
    size_bytes: int = 0  # what the folder held after the last sweep
    files: int = 0


@dataclass
class Counts:
    folders: dict[str, FolderCounts] = field(default_factory=lambda: {k: FolderCounts() for k in KINDS})
    sweeps: int = 0
    below_floor: bool = False  # the floor could not be met even with the archive emptied

    def as_dict(self) -> dict[str, object]:
        return {"sweeps": self.sweeps, "below_free_space_floor": self.below_floor,
                **{k: vars(c).copy() for k, c in self.folders.items()}}


def oldest_covering(files: Iterator[File], amount: int) -> list[File]:
    """The oldest files whose sizes add up to at least ``amount`` (all of them if they do not), oldest first.

    Holds only those files, not the whole listing: a heap of the candidates, newest on top, drops
    its newest as long as the others still cover the amount.
    """
    heap: list[tuple[float, int, str]] = []
    total = 0
    for mtime, size, path in files:
        heapq.heappush(heap, (-mtime, size, path))
        total += size
        while heap and total - heap[0][1] >= amount:
            total -= heapq.heappop(heap)[1]
    return sorted((-m, s, p) for m, s, p in heap)


class Retention:
    def __init__(self, settings: RetentionSettings, folders: FolderSettings, state_dir: Path,
                 watched: Callable[[], list[Path]]) -> None:
        self.settings = settings
        self.roots: dict[str, Path | None] = {"archive": folders.archive, "results": folders.results,
                                              "failed": folders.failed}
        self.state_dir = state_dir
        self.watched = watched
        self.counts = Counts()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        s = self.settings
        limits = [getattr(s, k) for k in KINDS]
        return bool(s.min_free and self.roots["archive"]) or any(f.max_age_days or f.max_size for f in limits)

    # the thread

    def __enter__(self) -> Retention:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
            self._thread.start()
        elif self.settings.min_free:
            log.warning("retention.min_free is set, but folders.archive is off: nothing is archived to delete")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # a fault here must not end the sweeps for months
                log.exception("retention sweep failed; the next one runs in %.0f s", self.settings.interval)
            self._stop.wait(self.settings.interval)

    # one sweep

    def sweep(self, now: float | None = None) -> Counts:
        """One pass over the three folders; returns the counts so far."""
        with self._lock:
            now = time.time() if now is None else now
            for kind in KINDS:
                root = self.roots[kind]
                if root is not None and root.is_dir():
                    self._keep(kind, root.resolve(), getattr(self.settings, kind), now, self._protected(kind))
            archive = self.roots["archive"]
            if self.settings.min_free and archive is not None and archive.is_dir():
                self._floor(archive.resolve(), self._protected("archive"))
            self.counts.sweeps += 1
            return self.counts

    def _protected(self, kind: str) -> list[Path]:
        """What a sweep of ``kind`` must not enter: the state (the spool, the MQTT outbox and the ledger of
        inputs in hand; all of it, unless the folder itself lies inside it), watched folders, and the
        other output folders where they lie inside this one (their own limits apply to them)."""
        root = self.roots[kind]
        assert root is not None
        root = root.resolve()
        state = self.state_dir.resolve()
        paths = [state / "spool", state / "mqtt", state / "in-hand.json"]
        if not root.is_relative_to(state):
            paths.append(state)
        paths += [p.resolve() for p in self.watched()]
        paths += [r.resolve() for k, r in self.roots.items() if k != kind and r is not None
                  and r.resolve() != root and r.resolve().is_relative_to(root)]
        return paths

    def _files(self, root: Path, protected: list[Path]) -> Iterator[File]:
        stack = [root]
        while stack:
            folder = stack.pop()
            if any(folder.resolve().is_relative_to(p) for p in protected):
                continue
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                log.warning("retention: cannot list %s: %s", folder, exc.strerror or exc)
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # gone meanwhile
                if stat.S_ISDIR(st.st_mode):
                    stack.append(Path(entry.path))
                elif stat.S_ISREG(st.st_mode) and Path(entry.path) not in protected:
                    yield st.st_mtime, st.st_size, entry.path

    def _delete(self, kind: str, files: list[File]) -> int:
        freed = 0
        counts = self.counts.folders[kind]
        for _, size, path in files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("retention: cannot delete %s: %s", path, exc.strerror or exc)
                continue
            counts.deleted_files += 1
            counts.deleted_bytes += size
            freed += size
        return freed

    def _keep(self, kind: str, root: Path, limits: FolderRetention, now: float, protected: list[Path]) -> None:
        counts = self.counts.folders[kind]
        before = counts.deleted_files
        cutoff = now - limits.max_age_days * _DAY if limits.max_age_days else None
        expired: list[File] = []
        total = files = 0
        for entry in self._files(root, protected):
            if cutoff is not None and entry[0] < cutoff:
                expired.append(entry)
                if len(expired) >= 1000:
                    self._delete(kind, expired)
                    expired.clear()
            else:
                total += entry[1]
                files += 1
        self._delete(kind, expired)
        if limits.max_size and total > limits.max_size:
            excess = total - int(limits.max_size)
            oldest = oldest_covering(self._files(root, protected), excess)
            total -= self._delete(kind, oldest)
            files -= len(oldest)
        counts.size_bytes, counts.files = total, files
        if counts.deleted_files > before:
            log.info("retention: deleted %d files from %s (%s)", counts.deleted_files - before, kind, root)

    def _free(self, path: Path) -> int:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def _floor(self, archive: Path, protected: list[Path]) -> None:
        need = int(self.settings.min_free) - self._free(archive)
        if need <= 0:
            self.counts.below_floor = False
            return
        oldest = oldest_covering(self._files(archive, protected), need)
        freed = self._delete("archive", oldest)
        self.counts.folders["archive"].size_bytes -= freed
        self.counts.folders["archive"].files -= len(oldest)
        log.warning("retention: %s had less than retention.min_free free; deleted the %d oldest archived images",
                    archive, len(oldest))
        below = self._free(archive) < self.settings.min_free
        if below and not self.counts.below_floor:
            log.error("retention: %s stays below retention.min_free with the archive emptied: something else "
                      "fills this filesystem", archive)
        self.counts.below_floor = below
