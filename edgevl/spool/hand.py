"""What the daemon has in hand, kept on disk so that the next start knows what a death interrupted.

An input is noted here while the daemon works on it (a file being taken, a spool
job being read, submitted or delivered, an MQTT message being stored) and
forgotten when that step ends. A daemon that dies on the way (a crash in native
code, the kernel's OOM killer, the service watchdog ending a hang, an exception
nothing caught) leaves it noted. The next start counts one death for each input
it finds; an input that was in hand at ``POISON_DEATHS`` consecutive deaths is
quarantined before anything else runs, so systemd never restarts edgevl into
the same input again.

Keys name the input by kind: ``file:<path>``, ``job:<spool key>``,
``mqtt:<sha256 of the payload>``.

The file is replaced by a rename but not fsynced: a process death keeps the page
cache, and a power cut is not an input's fault.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from edgevl.errors import EdgevlError

log = logging.getLogger(__name__)

POISON_DEATHS = 2
_MAX_POISON = 1000  # MQTT payloads waiting to be recognised; the oldest are forgotten first


class Hand:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()  # nested holds of one key count
        previous, poison = self._read()
        # In hand at the last death: one more death each. Inputs held again in this run carry
        # their count, so that "consecutive" deaths add up; any other step resets it.
        self.carried: dict[str, int] = {key: deaths + 1 for key, deaths in previous.items()}
        self._poison: list[str] = poison
        # Not rewritten yet: a start that dies before holding anything leaves the same
        # file, and the next start counts the same deaths, not one more.

    def _read(self) -> tuple[dict[str, int], list[str]]:
        try:
            data = json.loads(self.path.read_bytes())
            held = {str(k): int(v) for k, v in dict(data.get("held", {})).items()}
            return held, [str(k) for k in data.get("poison", [])]
        except FileNotFoundError:
            return {}, []
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring the unreadable %s: %s", self.path, exc)
            return {}, []

    def _write(self) -> None:
        held = {key: self.carried.get(key, 0) for key in self._held}
        # ensure_ascii: file names of any bytes (lone surrogates) survive the round trip.
        data = json.dumps({"held": held, "poison": self._poison[-_MAX_POISON:]}).encode()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
        except OSError as exc:  # a full disk must not stop the work; only the protection is weaker
            log.warning("cannot note the inputs in hand in %s: %s", self.path, exc.strerror or exc)

    def poisoned(self) -> list[tuple[str, int]]:
        """Inputs in hand at ``POISON_DEATHS`` or more consecutive deaths, with their count."""
        return sorted((key, deaths) for key, deaths in self.carried.items() if deaths >= POISON_DEATHS)

    @contextlib.contextmanager
    def holding(self, *keys: str) -> Iterator[None]:
        """Note ``keys`` as in hand for the block (several: inputs handed over together, noted in one write).

        A storage problem (``OSError``) or an input's own error (``EdgevlError``) leaving the block
        releases them: callers handle those. Any other exception leaves them noted, as a death would:
        it is a fault nobody foresaw, and the daemon is going down.
        """
        with self._lock:
            new = False
            for key in keys:
                self._held[key] += 1
                new = new or self._held[key] == 1  # a nested hold of the same key changes nothing on disk
            if new:
                self._write()
        try:
            yield
        except (OSError, EdgevlError):
            self.release(*keys)
            raise
        self.release(*keys)

    def release(self, *keys: str) -> None:
        with self._lock:
            gone = False
            for key in keys:
                self._held[key] -= 1
                if self._held[key] <= 0:
                    del self._held[key]
                    self.carried.pop(key, None)
                    gone = True
            if gone:
                self._write()

    # MQTT payloads cannot be set aside at start (the broker holds them): they are
    # remembered until they come again.
    def mark_poison(self, key: str) -> None:
        with self._lock:
            if key not in self._poison:
                self._poison.append(key)
            self._write()

    def take_poison(self, key: str) -> bool:
        """True (once) when ``key`` was marked poison."""
        with self._lock:
            if key not in self._poison:
                return False
            self._poison.remove(key)
            self._write()
            return True
