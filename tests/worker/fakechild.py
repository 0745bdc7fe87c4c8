"""A stand-in model worker for the supervisor's tests: the real protocol and process setup, no model.

Run as the supervisor runs its worker (``python -m tests.worker.fakechild [--load=…] FD PARENT_PID``).
``--load`` says how loading goes: ``ok`` (default), ``fatal``, ``crash``, ``hang``. A job's bytes say what
to do with it: ``answer``, ``crash``, ``exit:N``, ``hang`` (no progress, in Python), ``grow:MiB`` (touch that
much memory, then hang), ``slow:S`` (progress every 0.1 s for S seconds, then answer), ``garbage`` (send
something outside the protocol). A batch does what each of its jobs says, in turn, then answers them all.
An answer's timings carry the pages of a document the job could answer together.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from edgevl.worker.child import become_worker
from edgevl.worker.protocol import (
    Batch,
    Channel,
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


def _hang() -> None:
    while True:
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    load_mode = next((a.split("=", 1)[1] for a in argv if a.startswith("--load=")), "ok")
    fd, parent = int(argv[-2]), int(argv[-1])
    become_worker(parent)
    channel = worker_end(socket.socket(fileno=fd))
    first = channel.recv()
    if isinstance(first, Standby):  # a standby: the real one imports here; this one has nothing to import
        first = channel.recv()
    assert isinstance(first, Load)
    if load_mode == "fatal":
        channel.send(Fatal("model_missing", "no model here"))
        return 1
    if load_mode == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if load_mode == "hang":
        _hang()
    channel.send(Ready(os.getpid(), 0.01))
    while True:
        message = channel.recv()
        if isinstance(message, Stop):
            return 0
        assert isinstance(message, Work | Batch)
        works = (message,) if isinstance(message, Work) else message.works
        for work in works:
            _act(channel, work.data.decode())
        for work in works:
            channel.send(Done(work.key, work.job.result(
                {"sha256": "", "width": 1, "height": 1, "format": "PNG"}, {"id": "fake", "precision": "float32"},
                {}, {"total": 1.0, "pages_together": float(work.pages_together)})))


def _act(channel: Channel[FromWorker, ToWorker], what: str) -> None:
    what, _, arg = what.partition(":")
    if what == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif what == "exit":
        os._exit(int(arg))
    elif what == "hang":
        _hang()
    elif what == "grow":
        held = bytearray(int(arg) << 20)
        for i in range(0, len(held), 4096):
            held[i] = 1  # resident, not just reserved
        _hang()
    elif what == "slow":
        until = time.monotonic() + float(arg)
        while time.monotonic() < until:
            channel.send(Progress())
            time.sleep(0.1)
    elif what == "garbage":
        channel.send({"not": "a message"})  # type: ignore[arg-type]
        _hang()

if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
