"""systemd notifications (sd_notify): READY, STATUS, WATCHDOG, STOPPING, RELOADING.

Without ``NOTIFY_SOCKET`` (not started by systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import time

import systemd.daemon

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        usec = os.environ.get("WATCHDOG_USEC", "")
        # Ping at half the period systemd allows, as sd_watchdog_enabled(3) advises.
        self.watchdog_every = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else 0.0
        self._last_watchdog = 0.0

    def send(self, *fields: str) -> None:
        if not self.enabled:
            return
        # sd_notify does not retry a send that a signal interrupted (SIGTERM, SIGHUP
        # arrive any time); a lost status line must never end the daemon.
        for _ in range(3):
            try:
                systemd.daemon.notify("\n".join(fields))
                return
            except InterruptedError:
                continue
            except OSError as exc:
                log.warning("cannot notify the service manager: %s", exc)
                return

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def reloaded(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self, healthy: bool) -> None:
        """Feed the watchdog, at most every half period, and only when ``healthy``."""
        now = time.monotonic()
        if not (self.enabled and self.watchdog_every and healthy):
            return
        if now - self._last_watchdog >= self.watchdog_every:
            self.send("WATCHDOG=1")
            self._last_watchdog = now
