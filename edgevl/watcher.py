"""Watched folders: which files are complete and ready to be taken.

A file is ready once its size and mtime have not changed for ``settle_ms``, or
at once when its writer renamed it into place.  Events come from watchdog
(inotify, or polling for network shares); a periodic full rescan catches what
the events missed and the files that were there before the daemon started.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from edgevl.rules import Rule

log = logging.getLogger(__name__)

TEMPORARY = ("*.tmp", "*.part", "~$*", "*.crdownload", "*.partial", "*.swp")


def ignored_name(name: str) -> bool:
    lower = name.lower()
    return name.startswith(".") or any(fnmatch.fnmatchcase(lower, p) for p in TEMPORARY)


@dataclass
class _Candidate:
    rule: str
    size: int
    mtime_ns: int
    since: float
    renamed: bool


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if event.event_type == "moved":
            # inotify reports the writer's rename itself; a polling observer only
            # guesses moves from reused inode numbers, so there only settling counts.
            renamed = self.watcher.poll_interval == 0
            self.watcher.note(Path(os.fsdecode(event.dest_path)), renamed=renamed)
        elif event.event_type in ("created", "modified", "closed"):
            self.watcher.note(Path(os.fsdecode(event.src_path)))


class FolderWatcher:
    """Tracks candidate files of the rules' folders; ``ready()`` returns complete ones, oldest first."""

    def __init__(self, rules: tuple[Rule, ...], settle_ms: int, poll_interval: float, rescan_interval: float,
                 wake: threading.Event | None = None) -> None:
        self.settle = settle_ms / 1000
        self.poll_interval = poll_interval
        self.rescan_interval = rescan_interval
        self.wake = wake or threading.Event()
        self._lock = threading.Lock()
        self._candidates: dict[Path, _Candidate] = {}
        self._observer: Any = None
        self._watched: set[tuple[Path, bool]] = set()
        self._next_rescan = 0.0
        self.rules = rules

    # lifecycle
    def __enter__(self) -> FolderWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._observer = PollingObserver(timeout=self.poll_interval) if self.poll_interval > 0 else Observer()
        self._observer.daemon = True
        self._observer.start()
        self._schedule()
        self.rescan()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            if self._observer.is_alive():
                raise RuntimeError("the folder observer did not stop")
            self._observer = None

    @property
    def alive(self) -> bool:
        return self._observer is not None and bool(self._observer.is_alive())

    def set_rules(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self._observer.unschedule_all()
        self._watched.clear()
        with self._lock:
            self._candidates.clear()
        self._schedule()
        self.rescan()

    def _schedule(self) -> None:
        for rule in self.rules:
            for folder in rule.folders:
                key = (folder, rule.recursive)
                if key in self._watched:
                    continue
                if not folder.is_dir():
                    log.warning("watched folder %s of rule %s does not exist (yet); retrying at each rescan",
                                folder, rule.name, extra={"EDGEVL_RULE": rule.name})
                    continue
                self._observer.schedule(_Handler(self), str(folder), recursive=rule.recursive)
                self._watched.add(key)

    # matching
    def rule_for(self, path: Path) -> Rule | None:
        if ignored_name(path.name):
            return None
        name = path.name.lower()
        for rule in self.rules:
            for folder in rule.folders:
                inside = path.parent == folder or (rule.recursive and folder in path.parents)
                if inside and any(fnmatch.fnmatchcase(name, p.lower()) for p in rule.patterns):
                    if any(part.startswith(".") for part in path.relative_to(folder).parts):
                        return None
                    return rule
        return None

    def note(self, path: Path, renamed: bool = False) -> None:
        rule = self.rule_for(path)
        if rule is None:
            return
        try:
            st = path.stat()
        except OSError:
            return
        now = time.monotonic()
        with self._lock:
            old = self._candidates.get(path)
            if old is None or (old.size, old.mtime_ns) != (st.st_size, st.st_mtime_ns):
                self._candidates[path] = _Candidate(rule.name, st.st_size, st.st_mtime_ns, now,
                                                    renamed or bool(old and old.renamed))
            elif renamed:
                old.renamed = True
        self.wake.set()

    def rescan(self) -> None:
        self._schedule()
        for rule in self.rules:
            for folder in rule.folders:
                if not folder.is_dir():
                    continue
                walker = os.walk(folder) if rule.recursive else [(str(folder), [], os.listdir(folder))]
                for root, dirs, files in walker:
                    dirs[:] = [d for d in dirs if not d.startswith(".")]
                    for name in files:
                        self.note(Path(root) / name)
        self._next_rescan = time.monotonic() + self.rescan_interval

    def tick(self) -> None:
        if time.monotonic() >= self._next_rescan:
            self.rescan()

    def ready(self) -> list[tuple[Path, str]]:
        """Files complete now, oldest first, with their rule; unchanged ones stay candidates."""
        now = time.monotonic()
        out: list[tuple[float, Path, str]] = []
        with self._lock:
            items = list(self._candidates.items())
        for path, cand in items:
            try:
                st = path.stat()
            except OSError:
                self.forget(path)
                continue
            if (st.st_size, st.st_mtime_ns) != (cand.size, cand.mtime_ns):
                self.note(path)
                continue
            if cand.renamed or now - cand.since >= self.settle:
                out.append((cand.since, path, cand.rule))
        return [(p, r) for _, p, r in sorted(out)]

    def forget(self, path: Path) -> None:
        with self._lock:
            self._candidates.pop(path, None)

    def waiting(self) -> int:
        with self._lock:
            return len(self._candidates)

    def next_settle_in(self) -> float:
        """Seconds until the earliest candidate could be ready (for the main loop's sleep)."""
        with self._lock:
            if not self._candidates:
                return self.rescan_interval
            oldest = min(c.since for c in self._candidates.values())
        return max(0.0, oldest + self.settle - time.monotonic())
