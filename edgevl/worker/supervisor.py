"""The daemon's side of the model worker: start it, feed it, watch it, cap it and replace it.

One worker process at a time, and beside it, where the cap has room, a standby:
a second process that has joined the cap and imported torch, transformers and
the engine, and takes over the moment the worker is lost, so that a replacement
starts at its weights, not at its imports. A reader thread per process
(``edgevl.worker.process``) turns its messages into events for the daemon's
loop; a sampler thread reads the worker's resident size for the status and,
when no cgroup caps it, kills it above the limit. Everything else happens on
the daemon's loop: stall detection, restarts and their rate limit.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from edgevl.config import DEFAULT_MAX_PIXELS, PREPARED, Config
from edgevl.engine.model_files import resolve_model_path
from edgevl.errors import ConfigError, ModelError
from edgevl.records import Job, Record
from edgevl.rules import Rule
from edgevl.worker import footprint, memcap, protocol
from edgevl.worker.process import WorkerProcess
from edgevl.worker.protocol import ChannelClosed, Done, Fatal, FromWorker, Load, Progress, Ready, Standby, Stop, Work

log = logging.getLogger(__name__)

SAMPLE_EVERY = 0.05  # RSS sampling period: at ~30 GB/s a worker cannot outrun it by much
STOP_GRACE = 10.0  # seconds a worker gets to leave after "stop"
# A stuck worker is first asked for its Python stacks (SIGUSR1, faulthandler),
# which tell in the log where it hung, and killed this much later.
STUCK_KILL_GRACE = 2.0
# The worker: started with one end of the socket pair and the daemon's pid as its last two arguments.
WORKER_COMMAND = (sys.executable, "-m", "edgevl.worker.child")


@dataclass(frozen=True)
class Finished:
    key: str
    record: Record
    alarm_jpeg: bytes | None = None


@dataclass(frozen=True)
class Lost:
    """The worker died or was killed; ``keys`` are the jobs it was on (none when it had no job)."""

    keys: tuple[str, ...]
    code: str  # memory_limit | worker_crashed | worker_stalled
    detail: str


class WorkerSupervisor:
    def __init__(self, config: Config, wake: threading.Event, command: Sequence[str] = WORKER_COMMAND) -> None:
        self.config = config
        self.wake = wake
        self.command = tuple(command)
        self.worker: WorkerProcess | None = None
        self.keeps_standby = False  # model.standby, where it fits under the cap
        self._standby: WorkerProcess | None = None
        self.restarts = 0
        self.up_since = 0.0  # wall clock, for the status
        self._restart_times: collections.deque[float] = collections.deque()
        self._events: queue.Queue[tuple[WorkerProcess, FromWorker | None]] = queue.Queue()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._sampler: threading.Thread | None = None
        self.cap: memcap.MemoryCap | None = None
        self.max_frames = 1  # jobs one batch may hold, set once the memory cap is known
        self._request: Load | None = None
        # Set when the worker had to be replaced too often: the daemon exits and lets systemd decide.
        self.gave_up: str | None = None

    # lifecycle

    def __enter__(self) -> WorkerSupervisor:
        model = self.config.model
        path = resolve_model_path(model.id)
        auto_batch, auto_frames = _defaults()
        max_batch = model.max_batch or auto_batch
        limit = int(model.memory_limit)
        # As many frames as share a decode batch unless set, fewer where the memory cap would not hold them; int8's
        # prefill copy only where it fits beside them.
        self.max_frames, needed, prefill_copy = footprint.plan(
            path, model.precision, max_batch, model.max_pixels, limit, model.max_frames, auto_frames,
            footprint.prefill_copy_pays(model.precision))
        if needed.total > limit:
            int8 = footprint.estimate(path, "int8", max_batch, model.max_pixels)
            raise ConfigError(footprint.refusal(model.id, model.precision, needed, limit, int8))
        try:
            self.cap = memcap.setup(limit, model.memory_enforcement)
        except memcap.CgroupUnavailable as exc:
            raise ConfigError(f'model.memory_enforcement = "cgroup", but no cgroup can be made: {exc}') from None
        self.keeps_standby = model.standby and footprint.standby_fits(needed, limit)
        log.info("model worker: %s in %s needs ≈ %s with up to %d frames at a time%s; %s; memory cap %s", model.id,
                 model.precision, memcap.format_bytes(needed.total), self.max_frames,
                 " and a copy of the language model for its prefill" if prefill_copy else "",
                 "a standby beside it" if self.keeps_standby else
                 "no standby (model.standby)" if not model.standby else "no standby (no room for it under the cap)",
                 self.cap.describe())
        self._request = Load(str(path), model.id, model.precision, model.threads, model.max_batch,
                             model.max_pixels, str(self.cap.procs_file) if self.cap.procs_file else None,
                             logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
                             str(self.config.state_dir / "prepared") if model.precision in PREPARED else None,
                             prefill_copy)
        self._start()
        self._sampler = threading.Thread(target=self._sample, name="worker-rss", daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        worker = self.worker
        if worker is not None:
            grace = 0.0
            if not worker.jobs and worker.ready:
                with contextlib.suppress(ChannelClosed):
                    worker.channel.send(Stop())
                    grace = STOP_GRACE
            worker.end(grace)
        if self._standby is not None:
            self._standby.end(0)  # it holds nothing but its imports
        if self.cap is not None:
            self.cap.close()

    def _start(self) -> None:
        assert self._request is not None
        assert self.cap is not None
        standby, self._standby = self._standby, None
        if standby is not None and standby.alive and standby.take_over(self._request, self.cap.oom_kills()):
            worker = standby
            log.info("model worker %d starting: the standby takes over, its imports done", worker.pid)
        else:
            worker = WorkerProcess(self.command, self._request, self._events, self.wake, self.cap.oom_kills())
            log.info("model worker %d starting%s", worker.pid,
                     f" (standby {standby.pid} could not take over)" if standby is not None else "")
        with self._lock:
            self.worker = worker
        self.up_since = time.time()

    def _stand_by(self) -> None:
        """Start a standby for a worker that has just become ready: its imports then cost no answer a load."""
        if not self.keeps_standby or self._standby is not None or self._closing.is_set():
            return
        assert self._request is not None
        self._standby = WorkerProcess(self.command, Standby(self._request.procs_file, self._request.log_level),
                                      self._events, self.wake, 0)
        log.info("standby worker %d starting", self._standby.pid)

    def wait_ready(self, stop_requested: Any) -> bool:
        """Block until the first worker has loaded the model; False if a stop was requested first."""
        while not self.ready:
            if stop_requested():
                return False
            for event in self.poll(time.monotonic()):
                if isinstance(event, Lost):
                    raise ModelError(f"the model worker could not load the model: {event.detail}", event.code)
            self.wake.wait(0.2)
            self.wake.clear()
        return True

    # state

    @property
    def ready(self) -> bool:
        """Loaded and idle: it can take a job."""
        w = self.worker
        return w is not None and w.ready and not w.jobs and w.kill_reason is None

    @property
    def busy(self) -> bool:
        w = self.worker
        return w is not None and bool(w.jobs)

    @property
    def current(self) -> str | None:
        """The jobs in hand, for people: the first key, and how many more."""
        w = self.worker
        if w is None or not w.jobs:
            return None
        return w.jobs[0].key + (f" and {len(w.jobs) - 1} more" if len(w.jobs) > 1 else "")

    def seconds_since_progress(self, now: float) -> float:
        w = self.worker
        if w is None or (w.ready and not w.jobs):
            return 0.0
        return now - max(w.last_progress, w.job_started)

    def healthy(self, now: float) -> bool:
        """Idle, loading within its time, or making progress on a job; not stuck."""
        w = self.worker
        if w is None:
            return True  # between a death and its replacement (the replacement starts at once)
        return w.stuck_since is None and self._in_time(w, now)

    def _in_time(self, w: WorkerProcess, now: float) -> bool:
        limit = w.stall_timeout if w.jobs else self.config.model.load_timeout
        return self.seconds_since_progress(now) < limit

    def health(self) -> dict[str, Any]:
        w = self.worker
        now = time.monotonic()
        return {
            "pid": w.pid if w else None,
            "state": "down" if w is None else "stuck" if w.stuck_since else "busy" if w.jobs else
                     "ready" if w.ready else "loading",
            "up_since": self.up_since,
            "restarts": self.restarts,
            "rss": w.rss if w else 0,
            "memory_limit": int(self.config.model.memory_limit),
            "job": w.jobs[0].key if w and w.jobs else None,
            "jobs": [j.key for j in w.jobs] if w else [],
            "job_seconds": round(now - w.job_started, 1) if w and w.jobs else 0.0,
            "max_frames": self.max_frames,
            "standby": self._standby.pid if self._standby is not None and self._standby.alive else None,
        }

    # work

    def submit(self, key: str, job: Job, data: bytes, rule: Rule) -> None:
        self.submit_batch([Work(key, job, data, rule)])

    def submit_batch(self, works: Sequence[Work]) -> None:
        """Hand the worker one job, or up to ``max_frames`` to answer together."""
        w = self.worker
        if w is None or not self.ready:
            raise RuntimeError("the model worker is not ready")
        if not 1 <= len(works) <= self.max_frames:
            raise ValueError(f"a batch holds 1 to {self.max_frames} jobs, not {len(works)}")
        model_pixels = self.config.model.max_pixels
        pixels = max(work.rule.max_pixels or model_pixels for work in works)
        w.stall_timeout = self.config.model.stall_timeout or 120.0 * max(1.0, pixels / DEFAULT_MAX_PIXELS)
        # A document is answered after the batch's images: its pages may fill every frame the memory holds.
        works = [replace(work, pages_together=max(1, self.max_frames // footprint.frames_of(work.rule.max_pixels,
                                                                                             model_pixels)))
                 for work in works]
        w.jobs = list(works)
        w.job_started = w.last_progress = time.monotonic()
        try:
            w.channel.send(works[0] if len(works) == 1 else protocol.Batch(tuple(works)))
        except ChannelClosed:
            pass  # the reader reports the exit; the jobs are lost with it
        except Exception:
            w.jobs = []  # it could not even be encoded: nothing was sent, the worker is still free
            raise

    def poll(self, now: float) -> list[Finished | Lost]:
        """Handle the worker's messages and deaths, kill it when stalled; the daemon acts on what comes back."""
        out: list[Finished | Lost] = []
        while True:
            try:
                worker, message = self._events.get_nowait()
            except queue.Empty:
                break
            if message is None:
                lost = self._reap(worker)
                if lost is not None:
                    out.append(lost)
                continue
            if worker is not self.worker:
                continue
            if isinstance(message, Progress):
                worker.last_progress = now
            elif isinstance(message, Ready):
                worker.ready = True
                worker.last_progress = now
                log.info("model worker %d ready: model loaded in %.1f s", worker.pid, message.load_seconds)
                self._stand_by()
            elif isinstance(message, Done):
                worker.jobs = [j for j in worker.jobs if j.key != message.key]
                out.append(Finished(message.key, message.record, message.alarm_jpeg))
            elif isinstance(message, Fatal):
                # Deterministic (missing or unloadable model): no restart would help.
                worker.proc.wait()
                raise ModelError(message.message, message.code)
        w = self.worker
        if w is not None and w.kill_reason is None and not self._in_time(w, now):
            if w.jobs:
                w.kill_reason = ("worker_stalled", f"no progress for {w.stall_timeout:.0f} s")
            else:
                w.kill_reason = ("worker_stalled", f"still loading after {self.config.model.load_timeout:.0f} s")
            w.stuck_since = now
            log.error("model worker %d is stuck: %s (model.stall_timeout, model.load_timeout); "
                      "its Python stacks follow, then it is killed", w.pid, w.kill_reason[1])
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGUSR1)
        if w is not None and w.stuck_since is not None and now - w.stuck_since >= STUCK_KILL_GRACE:
            w.kill(*w.kill_reason or ("worker_stalled", "stuck"))
        return out

    def _reap(self, worker: WorkerProcess) -> Lost | None:
        code = worker.proc.wait()
        worker.channel.close()
        worker.gone = True
        how = _ending(code)
        if worker is self._standby and not self._closing.is_set():
            # Not replaced until a worker is next ready: a standby that cannot start must not loop.
            self._standby = None
            why = f" ({worker.kill_reason[1]})" if worker.kill_reason else ""
            log.warning("standby worker %d ended with %s%s; the next worker to be ready gets another", worker.pid,
                        how, why)
            return None
        if worker is not self.worker or self._closing.is_set():
            return None
        assert self.cap is not None
        limit = memcap.format_bytes(self.cap.limit)
        if worker.kill_reason is not None:
            reason, detail = worker.kill_reason
        elif self.cap.oom_kills() > worker.oom_kills:
            reason, detail = "memory_limit", f"the kernel killed it at its memory limit of {limit}"
        else:
            reason, detail = "worker_crashed", f"it ended with {how}"
        keys = tuple(j.key for j in worker.jobs)
        on = f" on job {keys[0]}" if len(keys) == 1 else f" on {len(keys)} jobs ({', '.join(keys)})" if keys else ""
        log.error("model worker %d lost%s: %s (%s)", worker.pid, on, reason, detail,
                  extra={"EDGEVL_JOB": keys[0]} if keys else None)
        with self._lock:
            self.worker = None
        # A death on jobs is theirs (each is tried again, alone, then failed): only deaths with no
        # job in hand count against max_restarts, so that no stream of bad inputs ends the daemon.
        self._restart(counted=not keys)
        return Lost(keys, reason, detail)

    def _restart(self, counted: bool) -> None:
        model = self.config.model
        now = time.monotonic()
        if counted:
            self._restart_times.append(now)
        while self._restart_times and self._restart_times[0] < now - model.restart_window:
            self._restart_times.popleft()
        if len(self._restart_times) > model.max_restarts:
            self.gave_up = (f"the model worker had to be replaced {len(self._restart_times)} times within "
                            f"{model.restart_window:.0f} s (model.max_restarts = {model.max_restarts})")
            return
        self.restarts += 1
        self._start()

    def _sample(self) -> None:
        assert self.cap is not None
        while not self._closing.wait(SAMPLE_EVERY):
            with self._lock:
                w = self.worker
            if w is None or w.gone:
                continue
            rss = memcap.rss_bytes(w.pid)
            if rss is None:
                continue
            w.rss = rss
            if self.cap.kernel_enforced or w.kill_reason is not None:
                continue
            # The high-water mark, not only the size now: a spike shorter than the sampling period
            # went over the ceiling all the same.
            peak = max(rss, memcap.peak_rss_bytes(w.pid) or 0)
            limit = memcap.format_bytes(self.cap.limit)
            standby = self._standby
            if peak > self.cap.limit:
                w.kill("memory_limit", f"its resident size reached {memcap.format_bytes(peak)}, over the limit "
                                       f"of {limit}")
                self.wake.set()
            elif standby is not None and standby is self._standby and not standby.gone and standby.kill_reason is None:
                # The limit holds the standby too, as a cgroup would; it holds nothing, so it goes first.
                beside = memcap.rss_bytes(standby.pid) or 0
                if peak + beside > self.cap.limit:
                    standby.kill("memory_limit", f"beside the worker's {memcap.format_bytes(peak)} it went over "
                                                 f"the limit of {limit}")


def _ending(code: int) -> str:
    """How a process ended, from its exit code (a signal without a name, such as a real-time one, by number)."""
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def _defaults() -> tuple[int, int]:
    """max_batch and max_frames from the core count."""
    from edgevl.engine.tuning import default_max_batch, default_max_frames

    return default_max_batch(), default_max_frames()
