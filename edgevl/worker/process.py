"""One model worker process as the daemon holds it: the process, its channel and the thread that reads it.

The reader thread turns the worker's messages into events for the daemon's loop and wakes it; everything
else about a worker (readiness, jobs in hand, why it was killed) is state that the supervisor keeps here
and changes on its loop only.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Sequence

from edgevl.worker.protocol import ChannelClosed, FromWorker, Load, Standby, Work, daemon_end


class WorkerProcess:
    def __init__(self, command: Sequence[str], request: Load | Standby,
                 events: queue.Queue[tuple[WorkerProcess, FromWorker | None]], wake: threading.Event,
                 oom_kills: int) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self.proc = subprocess.Popen(
                [*command, str(theirs.fileno()), str(os.getpid())], pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        self.channel = daemon_end(ours)
        self.started = time.monotonic()
        self.ready = False
        self.last_progress = self.started
        self.jobs: list[Work] = []  # in hand: sent and not yet done
        self.job_started = 0.0
        self.stall_timeout = 0.0
        self.kill_reason: tuple[str, str] | None = None
        self.stuck_since: float | None = None
        self.oom_kills = oom_kills  # the cap's count when this process began its load
        self.rss = 0
        self.gone = False
        self._events = events
        self._wake = wake
        threading.Thread(target=self._read, name=f"worker-{self.pid}", daemon=True).start()
        with contextlib.suppress(ChannelClosed):  # it died at once: the reader reports it
            self.channel.send(request)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return not self.gone and self.proc.poll() is None

    def take_over(self, load: Load, oom_kills: int) -> bool:
        """A standby becomes the worker: it loads from now on. False when it is gone (the reader reports it)."""
        try:
            self.channel.send(load)
        except ChannelClosed:
            return False
        self.started = self.last_progress = time.monotonic()
        self.oom_kills = oom_kills  # a memory kill of the worker it replaces is not its own
        return True

    def _read(self) -> None:
        while True:
            try:
                message: FromWorker | None = self.channel.recv()
            except ChannelClosed:
                # It is gone, or it spoke outside the protocol: either way it is done (and reaping
                # a worker that still runs would block the loop).
                message = None
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
            self._events.put((self, message))
            self._wake.set()
            if message is None:
                return

    def kill(self, code: str, detail: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = (code, detail)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def end(self, grace: float) -> None:
        """Close it down: ``grace`` seconds to leave by itself (0: killed at once), then reaped."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.channel.close()
