"""What the daemon and its model worker say to each other, typed both ways, and how it travels.

The daemon sends ``Load`` once, then ``Work`` (one job) or ``Batch`` (several,
answered together in the stream mode) and finally ``Stop``. A standby is sent
``Standby`` first: it joins the memory cap, imports torch and the engine, and
waits for the ``Load`` that makes it the worker. The worker answers
``Ready`` once the model is loaded (or ``Fatal`` when it cannot be), ``Progress``
while it computes, and ``Done`` with each job's record.

Messages are pickled into length-prefixed frames on a socket pair. Both ends are
edgevl's own processes, started with the same code, so pickle is safe here;
nothing from outside goes through it as an object: an input's bytes travel as
bytes, and an MQTT sender's ``meta`` never travels at all (it stays in the spool
as JSON text).
"""

from __future__ import annotations

import pickle
import socket
import struct
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from edgevl.records import Job, Record
from edgevl.rules import Rule

_HEADER = struct.Struct("<Q")


# daemon → worker


@dataclass(frozen=True)
class Load:
    model_path: str
    model_id: str
    precision: str
    threads: int
    max_batch: int
    max_pixels: int
    procs_file: str | None  # the cgroup to join before anything is allocated
    log_level: str = "info"  # the daemon's, which the worker follows
    prepared_dir: str | None = None  # int8, float32: where its prepared weights are kept between starts
    prefill_copy: bool = False  # int8: may keep a second copy of the language model for its prefill


@dataclass(frozen=True)
class Standby:
    """Get ready to take over: join the cap and import what loading needs, then wait for ``Load``."""

    procs_file: str | None
    log_level: str = "info"


@dataclass(frozen=True)
class Work:
    key: str
    job: Job
    data: bytes
    rule: Rule
    pages_together: int = 1  # a document's pages answered together (the stream mode), as its memory allows


@dataclass(frozen=True)
class Batch:
    """Jobs answered together: their images share forward passes, each answered as it would be alone."""

    works: tuple[Work, ...]


@dataclass(frozen=True)
class Stop:
    pass


# worker → daemon


@dataclass(frozen=True)
class Ready:
    pid: int
    load_seconds: float


@dataclass(frozen=True)
class Progress:
    """A forward pass finished: the job is long, not hung."""


@dataclass(frozen=True)
class Done:
    key: str
    record: Record
    alarm_jpeg: bytes | None = None  # the frame, for rules with alarm_image, when an answer raised an alarm


@dataclass(frozen=True)
class Fatal:
    """The model cannot be loaded; no restart would help."""

    code: str
    message: str


ToWorker = Standby | Load | Work | Batch | Stop
FromWorker = Ready | Progress | Done | Fatal
TO_WORKER = (Standby, Load, Work, Batch, Stop)
FROM_WORKER = (Ready, Progress, Done, Fatal)

Out = TypeVar("Out")
In = TypeVar("In")


class ChannelClosed(Exception):
    """The other end went away (or sent something that is not a message of the protocol)."""


class Channel(Generic[Out, In]):
    """One end of the socket pair: sends ``Out`` messages, receives ``In`` messages."""

    def __init__(self, sock: socket.socket, accepts: tuple[type, ...]) -> None:
        self.sock = sock
        self.accepts = accepts

    def send(self, message: Out) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)  # may raise before anything is sent
        try:
            self.sock.sendall(_HEADER.pack(len(data)) + data)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None

    def recv(self) -> In:
        """The next message; blocks. ``ChannelClosed`` at end of stream."""
        (size,) = _HEADER.unpack(self._read(_HEADER.size))
        message = pickle.loads(self._read(size))
        if not isinstance(message, self.accepts):
            raise ChannelClosed(f"not a message of the protocol: {type(message).__name__}")
        return cast(In, message)

    def _read(self, size: int) -> bytes:
        chunks = []
        while size:
            try:
                chunk = self.sock.recv(min(size, 1 << 20))
            except OSError as exc:
                raise ChannelClosed(str(exc)) from None
            if not chunk:
                raise ChannelClosed("end of stream")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


def daemon_end(sock: socket.socket) -> Channel[ToWorker, FromWorker]:
    return Channel(sock, FROM_WORKER)


def worker_end(sock: socket.socket) -> Channel[FromWorker, ToWorker]:
    return Channel(sock, TO_WORKER)
