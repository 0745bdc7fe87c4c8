"""The model worker: a child process of the daemon that loads the model once and answers jobs.

Started as ``python -m edgevl.worker.child FD PARENT_PID`` with one end of a
socket pair; it speaks ``edgevl.worker.protocol``. torch is imported here, in
the capped process, and nowhere in the daemon. A standby is the same process
started ahead of need: it imports, then waits for its ``Load``.
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
from pathlib import Path
from typing import TYPE_CHECKING

from edgevl.errors import EdgevlError
from edgevl.logsetup import set_level, setup_logging
from edgevl.records import Record, all_answers, is_error
from edgevl.worker.protocol import (
    Batch,
    Channel,
    ChannelClosed,
    Done,
    Fatal,
    FromWorker,
    Load,
    Progress,
    Ready,
    Standby,
    Stop,
    ToWorker,
    Work,
    worker_end,
)

if TYPE_CHECKING:  # torch is imported in the worker only once it has joined its memory cap
    from edgevl.engine.engine import Engine

log = logging.getLogger("edgevl.worker")

# The daemon learns of progress at most this often; its stall timeouts are minutes.
PROGRESS_EVERY = 0.5
_PR_SET_PDEATHSIG = 1


def become_worker(parent: int) -> None:
    """What makes a process a well-behaved worker of ``parent``; test workers call it too."""
    # A worker orphaned by a killed daemon would hold gigabytes and a claim on
    # the CPU; the kernel ends it with its parent.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    # The daemon decides when the worker stops; a stop signal meant for the
    # service (systemd, Ctrl-C on the terminal) must not cut a job short here.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The daemon asks a stuck worker where it is before it kills it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def join_cgroup(procs_file: str | None, channel: Channel[FromWorker, ToWorker]) -> bool:
    """Enter the memory-capped cgroup before anything is allocated; False (and Fatal sent) when that fails."""
    if not procs_file:
        return True
    try:
        Path(procs_file).write_text(str(os.getpid()))
    except OSError as exc:
        channel.send(Fatal("memory_cap_failed", f"cannot join {procs_file}: {exc.strerror or exc}"))
        return False
    return True


def _oom_score(adjust: str) -> str | None:
    """Set this process's OOM score adjustment; the one it had, or None where that cannot be done. A process
    may raise its own and lower it again to what it inherited, without privileges."""
    path = Path("/proc/self/oom_score_adj")
    try:
        before = path.read_text().strip()
        path.write_text(adjust)
    except OSError:
        return None
    return before


def import_engine() -> None:
    """What answering needs imported (torch, transformers, the engine): seconds of a start that a standby
    spends before it is needed."""
    import edgevl.engine.engine
    import edgevl.engine.loading
    import edgevl.engine.pipeline  # noqa: F401


class _Progress:
    def __init__(self, channel: Channel[FromWorker, ToWorker]) -> None:
        self.channel = channel
        self.last = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            self.channel.send(Progress())


def _alarm_frame(message: Work, record: Record) -> bytes | None:
    """Made here, where untrusted images may be decoded: the daemon never decodes one."""
    if not message.rule.alarm_image or is_error(record):
        return None
    alarming = [page for page, _, answer in all_answers(record) if answer.get("alarm")]
    if not alarming:
        return None
    from edgevl.documents import alarm_jpeg

    try:
        return alarm_jpeg(message.data, alarming[0])
    except Exception:  # the answer stands without its picture
        log.exception("job %s: no alarm frame", message.job.job_id)
        return None


def serve(channel: Channel[FromWorker, ToWorker]) -> int:
    load = channel.recv()
    if isinstance(load, Standby):
        # A standby: inside the cap and imported, idle until the worker it stands by for is lost.
        set_level(load.log_level)
        if not join_cgroup(load.procs_file, channel):
            return 1
        score = _oom_score("1000")  # should the cap's cgroup run out, the kernel's choice falls on the standby
        import_engine()
        load = channel.recv()
        if score is not None:  # a worker now: as likely to go as the one it replaces
            _oom_score(score)
    if not isinstance(load, Load):
        raise ChannelClosed(f"expected Load, got {type(load).__name__}")
    set_level(load.log_level)
    if not join_cgroup(load.procs_file, channel):
        return 1
    # Heavy imports only here, inside the capped process.
    from edgevl.engine.engine import Engine
    from edgevl.engine.loading import load_model

    try:
        lm = load_model(load.model_path, load.precision, load.threads,  # type: ignore[arg-type]
                        Path(load.prepared_dir) if load.prepared_dir else None, prefill_copy=load.prefill_copy)
        lm.model_id = load.model_id
        engine = Engine(lm, max_batch=load.max_batch, max_pixels=load.max_pixels, on_progress=_Progress(channel))
    except EdgevlError as exc:
        channel.send(Fatal(exc.code, exc.message))
        return 1
    channel.send(Ready(os.getpid(), lm.load_seconds))
    while True:
        message = channel.recv()
        if isinstance(message, Stop):
            return 0
        if isinstance(message, Work):
            works: tuple[Work, ...] = (message,)
        elif isinstance(message, Batch):
            works = message.works
        else:
            raise ChannelClosed(f"expected Work, Batch or Stop, got {type(message).__name__}")
        for work, record in zip(works, _answer(engine, works), strict=True):
            channel.send(Done(work.key, record, _alarm_frame(work, record)))


def _answer(engine: Engine, works: tuple[Work, ...]) -> list[Record]:
    """The jobs' records: together in one stream; should that fail as a whole, each alone, so that whatever
    made it fail costs only the job that brought it."""
    from edgevl.engine.pipeline import Asked, answer_inputs

    if len(works) > 1:
        try:
            return answer_inputs(engine, [(w.job, w.data, Asked.of(w.rule, pages_together=w.pages_together))
                                          for w in works])
        except Exception:  # MemoryError included: alone, each needs less
            log.exception("a batch of %d jobs failed together; answering each alone", len(works))
    records: list[Record] = []
    for work in works:
        try:
            asked = Asked.of(work.rule, pages_together=work.pages_together)
            records.extend(answer_inputs(engine, [(work.job, work.data, asked)]))
        except MemoryError:
            records.append(work.job.error("memory_limit", "the model ran out of memory on this image"))
        except Exception as exc:  # a bug must cost one image, not the worker
            log.exception("job %s failed inside the engine", work.job.job_id)
            records.append(work.job.error("engine_failed", f"{type(exc).__name__}: {exc}"))
    return records


def main(argv: list[str]) -> int:
    fd, parent = int(argv[1]), int(argv[2])
    become_worker(parent)
    setup_logging()
    channel = worker_end(socket.socket(fileno=fd))
    try:
        return serve(channel)
    except ChannelClosed:
        return 0  # the daemon is gone or closed the channel: nothing left to do


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
