"""The durable MQTT outbox: messages wait on disk until the broker has acknowledged them.

One file per entry (all the messages of one job's record, or one input error),
named so that names sort in the order entries were made.  An entry is written
(fsynced) before the spool forgets its job and removed only once every one of
its messages is acknowledged, so neither a broker that is away for hours nor a
daemon restart loses a result.  Delivery is at least once: a crash between the
broker's acknowledgement and the removal publishes that entry again, and
subscribers can recognise it by its ``job_id``.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from edgevl.fsutil import atomic_write, fsync_dir
from edgevl.mqtt.messages import OutMessage
from edgevl.records import new_job_id

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # entries come from the loop and from the MQTT thread (input errors)
        for stale in root.glob(".tmp-*"):
            stale.unlink(missing_ok=True)
        self._names = sorted(p.name for p in root.glob("*.json"))

    def put(self, messages: list[OutMessage], key: str | None = None) -> str:
        """Keep ``messages`` until published. A ``key`` makes the entry idempotent: put twice, kept once."""
        name = f"{key or new_job_id()}.json"
        with self._lock:
            if name in self._names:
                return name
        atomic_write(self.root / name, json.dumps([m.to_json() for m in messages]).encode())
        with self._lock:
            self._names.append(name)
            self._names.sort()
        return name

    def names(self) -> list[str]:
        with self._lock:
            return list(self._names)

    def load(self, name: str) -> list[OutMessage] | None:
        """The entry's messages; None (and the entry dropped) when it cannot be read back."""
        try:
            data = json.loads((self.root / name).read_bytes())
            return [OutMessage.from_json(m) for m in data]
        except FileNotFoundError:
            self._forget(name)
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("dropping unreadable outbox entry %s: %s", name, exc)
            self.remove(name)
            return None

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)
        fsync_dir(self.root)
        self._forget(name)

    def _forget(self, name: str) -> None:
        with self._lock:
            if name in self._names:
                self._names.remove(name)

    def __len__(self) -> int:
        with self._lock:
            return len(self._names)
