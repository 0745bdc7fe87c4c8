"""Watched folders: which files are complete and ready to be taken.

A file is ready once its size and mtime have not changed for ``settle_ms``, or
at once when its writer renamed it into place.  Events come from watchdog
(inotify, or polling for network shares); a periodic full rescan catches what
the events missed and the files that were there before the daemon started.

Only regular files are candidates (``lstat``; symbolic links to regular files
when the rule accepts links). Anything else that matches a rule (a directory,
a FIFO, a socket, a device, a link) is never opened: it gets one log line and is
passed over from then on. A folder that cannot be read, disappears or is
re-created is logged once and watched again as soon as it can be; a watcher
thread that died is replaced.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.polling import PollingObserver

from edgevl.folders.matching import rule_for
from edgevl.fsutil import kind_of
from edgevl.names import display
from edgevl.rules import Rule

log = logging.getLogger(__name__)

CHECK_EVERY = 1.0  # seconds between checks that the watched folders are still the ones watched


@dataclass
class _Candidate:
    rule: str
    size: int
    mtime_ns: int
    since: float
    renamed: bool


@dataclass(frozen=True)
class _Watch:
    handle: Any  # watchdog's ObservedWatch
    identity: tuple[int, int]  # (st_dev, st_ino) of the folder when it was scheduled


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        # This runs on watchdog's thread: an exception here would end it and blind the folders.
        try:
            self._handle(event)
        except Exception:
            log.exception("handling %s of %s", event.event_type, event.src_path)

    def _handle(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if event.event_type in ("deleted", "moved"):
                self.watcher.recheck_soon()  # a watched folder itself may be gone
            return
        if event.event_type == "moved":
            if not event.dest_path:
                return  # renamed to outside the watched tree: gone, like a deleted file
            # inotify reports the writer's rename itself, also from a folder outside the
            # watched tree (an empty source); a polling observer only guesses moves from
            # reused inode numbers, so there only settling counts.
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
        self._passed_over: dict[Path, str] = {}  # entries that are not taken, with why (logged once)
        self._problems: dict[Path, str] = {}  # folders that cannot be watched, with why (logged once)
        self._observer: Any = None
        self._watched: dict[tuple[Path, bool], _Watch] = {}
        self._next_rescan = 0.0
        self._next_check = 0.0
        self.rules = rules

    # lifecycle
    def __enter__(self) -> FolderWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        # Full events: a file renamed in from outside the watched tree is reported as moved, not as created, so it
        # is taken at once, as complete as one renamed inside (a writer's temporary folder on the same share).
        self._observer = (PollingObserver(timeout=self.poll_interval) if self.poll_interval > 0
                          else InotifyObserver(generate_full_events=True))
        self._observer.daemon = True
        self._observer.start()
        self._watched.clear()
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
        for watch in self._watched.values():
            self._unschedule(watch)
        self._watched.clear()
        self._problems.clear()
        with self._lock:
            self._candidates.clear()
            self._passed_over.clear()
        self._schedule()
        self.rescan()

    def _problem(self, folder: Path, why: str | None) -> None:
        """Log a folder's problem once, and once more when it is solved."""
        old = self._problems.get(folder)
        if why == old:
            return
        if why is None:
            del self._problems[folder]
            log.info("watched folder %s can be read again", folder)
            return
        self._problems[folder] = why
        log.warning("watched folder %s: %s; trying again every %.0f s", folder, why, CHECK_EVERY)

    def _schedule(self) -> None:
        for rule in self.rules:
            for folder in rule.folders:
                key = (folder, rule.recursive)
                if key in self._watched:
                    continue
                try:
                    st = os.stat(folder)
                    if not stat.S_ISDIR(st.st_mode):
                        self._problem(folder, f"is a {kind_of(st.st_mode)}, not a folder")
                        continue
                    os.listdir(folder)  # readable: inotify would accept a folder nobody may list
                    handle = self._observer.schedule(_Handler(self), str(folder), recursive=rule.recursive)
                except FileNotFoundError:
                    self._problem(folder, f"does not exist (yet) (rule {rule.name})")
                    continue
                except OSError as exc:
                    self._problem(folder, f"cannot be watched: {exc.strerror or exc}")
                    continue
                self._watched[key] = _Watch(handle, (st.st_dev, st.st_ino))
                if folder in self._problems:
                    self._problem(folder, None)

    def _unschedule(self, watch: _Watch) -> None:
        try:
            self._observer.unschedule(watch.handle)
        except Exception as exc:  # its emitter may have stopped with its folder
            log.debug("unscheduling a watch: %s", exc)

    def recheck_soon(self) -> None:
        self._next_check = 0.0
        self.wake.set()

    def _check_folders(self) -> None:
        """Watch again the folders that were deleted, replaced or re-created since they were scheduled."""
        for (folder, recursive), watch in list(self._watched.items()):
            try:
                st = os.stat(folder)
                same = (st.st_dev, st.st_ino) == watch.identity and stat.S_ISDIR(st.st_mode)
            except OSError:
                same = False
            if same:
                continue
            self._unschedule(watch)
            del self._watched[(folder, recursive)]
            log.warning("watched folder %s was deleted or replaced; watching it again when it is there", folder)
        before = set(self._watched)
        self._schedule()
        if set(self._watched) - before:
            self.rescan()  # files that arrived before the new watch

    # matching
    def rule_for(self, path: Path) -> Rule | None:
        return rule_for(self.rules, path)

    def pass_over(self, path: Path, why: str) -> None:
        """Not offered again (one log line): an entry that is not a regular file, or one the spool
        refused to take because it changed since it was noted."""
        with self._lock:
            self._candidates.pop(path, None)
            if self._passed_over.get(path) == why:
                return
            self._passed_over[path] = why
        shown = display(str(path))[0]
        log.warning("not taking %s: %s", shown, why, extra={"EDGEVL_IMAGE": shown})

    def note(self, path: Path, renamed: bool = False) -> None:
        rule = self.rule_for(path)
        if rule is None:
            return
        try:
            st = os.lstat(path)
        except OSError:
            return  # gone
        if stat.S_ISLNK(st.st_mode):
            if not rule.follow_symlinks:
                self.pass_over(path, f"a symbolic link (rule {rule.name} does not follow links)")
                return
            try:
                st = os.stat(path)  # the target's size and mtime
            except OSError as exc:
                self.pass_over(path, f"a link to nothing ({exc.strerror or exc})")
                return
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode) and rule.recursive:
                return  # a subfolder of a recursive rule: watched, not taken
            self.pass_over(path, f"a {kind_of(st.st_mode)}, not a regular file")
            return
        now = time.monotonic()
        with self._lock:
            self._passed_over.pop(path, None)
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
                try:
                    self._scan(rule, folder)
                except OSError as exc:
                    if folder not in self._problems:  # said once, by whichever step met it first
                        self._problem(folder, f"cannot be read: {exc.strerror or exc}")
        with self._lock:
            self._passed_over = {p: why for p, why in self._passed_over.items() if os.path.lexists(p)}
        self._next_rescan = time.monotonic() + self.rescan_interval

    def _scan(self, rule: Rule, folder: Path) -> None:
        if not folder.is_dir():
            return
        if rule.recursive:
            for root, dirs, files in os.walk(folder):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in files:
                    self.note(Path(root) / name)
        else:
            for name in os.listdir(folder):
                self.note(folder / name)
        if self._problems.get(folder, "").startswith("cannot be read"):
            self._problem(folder, None)

    def tick(self) -> None:
        now = time.monotonic()
        if self._observer is not None and not self._observer.is_alive():
            log.error("the folder watcher thread died; starting a new one")
            self.start()
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY
            self._check_folders()
        if now >= self._next_rescan:
            self.rescan()

    def ready(self) -> list[tuple[Path, str]]:
        """Files complete now, oldest first, with their rule; unchanged ones stay candidates."""
        now = time.monotonic()
        out: list[tuple[float, Path, str]] = []
        with self._lock:
            items = list(self._candidates.items())
        for path, cand in items:
            try:
                st = os.stat(path)  # through an accepted link: its target (note() checked the kind)
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
                return min(self.rescan_interval, CHECK_EVERY)
            oldest = min(c.since for c in self._candidates.values())
        return max(0.0, oldest + self.settle - time.monotonic())
