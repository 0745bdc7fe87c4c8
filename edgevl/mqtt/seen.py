"""Ids of MQTT input messages already taken, so that a redelivered message is not answered twice.

A broker redelivers a QoS 1 message whose acknowledgement it did not get, and
senders retry; both repeat the message's id.  The ids are appended to a log
file (fsynced before the message is acknowledged) and the newest ``keep`` of
them are remembered across restarts.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from edgevl.fsutil import atomic_write


class SeenIds:
    def __init__(self, path: Path, keep: int = 100_000) -> None:
        self.path = path
        self.keep = keep
        self._lock = threading.Lock()
        self._ids: OrderedDict[str, None] = OrderedDict()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line:
                    self._ids[line] = None
        except FileNotFoundError:
            pass
        self._trim()
        self._compact()

    def __contains__(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._ids

    def add(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._ids:
                return
            with self.path.open("a", encoding="utf-8") as f:
                f.write(job_id + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._ids[job_id] = None
            if len(self._ids) > 2 * self.keep:
                self._trim()
                self._compact()

    def _trim(self) -> None:
        while len(self._ids) > self.keep:
            self._ids.popitem(last=False)

    def _compact(self) -> None:
        atomic_write(self.path, "".join(i + "\n" for i in self._ids).encode())
