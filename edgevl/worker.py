"""The model worker: a child process of the daemon that loads the model once and answers jobs.

Started as ``python -m edgevl.worker FD`` with one end of a socket pair. The
daemon sends ``("load", …)`` and then ``("job", …)``/``("stop",)``; the worker
answers ``("ready", …)``, ``("progress",)`` while it computes, ``("done", key,
record)``, or ``("fatal", code, message)`` when the model cannot be loaded.

This module stays light at import time: the daemon imports it only to name it,
and torch is imported by the worker process alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgevl.channel import Channel, ChannelClosed
from edgevl.errors import EdgevlError
from edgevl.records import Job
from edgevl.rules import Rule

log = logging.getLogger("edgevl.worker")

# The daemon learns of progress at most this often; its stall timeouts are minutes.
PROGRESS_EVERY = 0.5
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class LoadRequest:
    model_path: str
    model_id: str
    precision: str
    threads: int
    max_batch: int
    max_pixels: int
    procs_file: str | None  # the cgroup to join before anything is allocated


@dataclass(frozen=True)
class JobRequest:
    key: str
    job: Job
    data: bytes
    rule: Rule


def _die_with_parent(parent: int) -> None:
    # A worker orphaned by a killed daemon would hold gigabytes and a claim on
    # the CPU; the kernel ends it with its parent.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


class _Progress:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.last = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            self.channel.send(("progress",))


def _held(job: JobRequest) -> bool:
    """Test-only switch: while the file named by EDGEVL_TEST_HOLD_FILE exists (and, when it holds
    text, the image's path, topic or source kind contains it), the job waits before the model runs, making no
    progress."""
    hold = os.environ.get("EDGEVL_TEST_HOLD_FILE")
    if not hold:
        return False
    try:
        needle = Path(hold).read_text().strip()
    except OSError:
        return False
    source = job.job.source
    return needle in str(source.get("path") or source.get("topic") or source.get("kind") or "")


def serve(channel: Channel) -> int:
    request: LoadRequest = channel.recv()
    if request.procs_file:
        try:
            Path(request.procs_file).write_text(str(os.getpid()))
        except OSError as exc:
            channel.send(("fatal", "memory_cap_failed", f"cannot join {request.procs_file}: {exc.strerror or exc}"))
            return 1
    # Heavy imports only here, inside the capped process.
    from edgevl.engine.engine import Engine
    from edgevl.engine.loading import load_model
    from edgevl.pipeline import answer_image

    try:
        lm = load_model(request.model_path, request.precision, request.threads)  # type: ignore[arg-type]
        lm.model_id = request.model_id
        progress = _Progress(channel)
        engine = Engine(lm, max_batch=request.max_batch, max_pixels=request.max_pixels, on_progress=progress)
    except EdgevlError as exc:
        channel.send(("fatal", exc.code, exc.message))
        return 1
    channel.send(("ready", {"pid": os.getpid(), "load_seconds": lm.load_seconds}))
    while True:
        message = channel.recv()
        if message[0] == "stop":
            return 0
        job: JobRequest = message[1]
        while _held(job):
            time.sleep(0.05)
        try:
            record = answer_image(engine, job.job, job.data, job.rule.questions, job.rule.crop, job.rule.max_pixels)
        except MemoryError:
            record = job.job.error("memory_limit", "the model ran out of memory on this image")
        except Exception as exc:  # a bug must cost one image, not the worker
            log.exception("job %s failed inside the engine", job.job.job_id)
            record = job.job.error("engine_failed", f"{type(exc).__name__}: {exc}")
        channel.send(("done", job.key, record))


def main(argv: list[str]) -> int:
    fd, parent = int(argv[1]), int(argv[2])
    _die_with_parent(parent)
    # The daemon decides when the worker stops; a stop signal meant for the
    # service (systemd, Ctrl-C on the terminal) must not cut a job short here.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The daemon asks a stuck worker where it is before it kills it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from edgevl.logsetup import setup_logging

    setup_logging(verbose=os.environ.get("EDGEVL_VERBOSE") == "1")
    channel = Channel(socket.socket(fileno=fd))
    try:
        return serve(channel)
    except ChannelClosed:
        return 0  # the daemon is gone or closed the channel: nothing left to do


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
