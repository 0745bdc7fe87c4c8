"""The supervisor in process, against a small fake worker (tests/worker/fakechild.py) that speaks the real
protocol: answers, crashes, stalls, memory over the limit, a worker outside the protocol, the restart limit.

The real worker's kernel cap and kill -9 behaviour are tested with real processes in test_worker.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgevl.config import Config, load_config
from edgevl.errors import ModelError
from edgevl.records import Job, Source
from edgevl.rules import Rule
from edgevl.worker import footprint, memcap
from edgevl.worker.protocol import Work
from edgevl.worker.supervisor import Finished, Lost, WorkerSupervisor

RULE = Rule.model_validate({"name": "cam", "question": [{"id": "q", "ask": "?"}]})
Event = Finished | Lost


def _config(tmp_path: Path, model: Path, extra: str = "") -> Config:
    path = tmp_path / "edgevl.toml"
    path.write_text(f'state_dir = "{tmp_path}/state"\n[model]\nid = "{model}"\nmax_pixels = 40000\nthreads = 1\n'
                    f'memory_enforcement = "rss"\n{extra}\n')
    return load_config(path)


@pytest.fixture
def supervise(tmp_path: Path, test_model_dir: Path) -> Iterator[Callable[..., WorkerSupervisor]]:
    """A started supervisor of fake workers; ``load`` says how they load, ``extra`` is [model] configuration."""
    with_stack: list[WorkerSupervisor] = []

    def start(load: str = "ok", extra: str = "") -> WorkerSupervisor:
        command = [sys.executable, "-m", "tests.worker.fakechild", f"--load={load}"]
        supervisor = WorkerSupervisor(_config(tmp_path, test_model_dir, extra), threading.Event(), command)
        supervisor.__enter__()
        with_stack.append(supervisor)
        return supervisor

    yield start
    for supervisor in with_stack:
        supervisor.__exit__(None, None, None)


def _until(supervisor: WorkerSupervisor, done: Callable[[list[Event]], bool], timeout: float = 30) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += supervisor.poll(time.monotonic())
        if done(events):
            return events
        supervisor.wake.wait(0.05)
        supervisor.wake.clear()
    raise AssertionError(f"not within {timeout} s; events so far: {events}")


def _ready(supervisor: WorkerSupervisor) -> int:
    assert supervisor.wait_ready(lambda: False)
    pid = supervisor.health()["pid"]
    assert isinstance(pid, int)
    return pid


def _submit(supervisor: WorkerSupervisor, key: str, what: bytes) -> None:
    supervisor.submit(key, Job(rule="cam", source=Source(kind="http")), what, RULE)


def test_a_job_is_answered_and_the_worker_stops_when_asked(supervise: Callable[..., WorkerSupervisor]) -> None:
    supervisor = supervise()
    pid = _ready(supervisor)
    _submit(supervisor, "k1", b"slow:0.3")
    assert supervisor.busy
    (event,) = _until(supervisor, lambda e: bool(e))
    assert isinstance(event, Finished)
    assert (event.key, event.record["schema"]) == ("k1", "edgevl.result/2")
    assert supervisor.ready
    supervisor.__exit__(None, None, None)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_crash_on_a_job_loses_that_job_and_the_worker_is_replaced(
        supervise: Callable[..., WorkerSupervisor]) -> None:
    supervisor = supervise()
    first = _ready(supervisor)
    _submit(supervisor, "poison", b"crash")
    (lost,) = _until(supervisor, lambda e: bool(e))
    assert lost == Lost(("poison",), "worker_crashed", "it ended with signal SIGSEGV")
    second = _ready(supervisor)
    assert second != first
    assert supervisor.restarts == 1
    _submit(supervisor, "next", b"answer")
    assert isinstance(_until(supervisor, lambda e: bool(e))[0], Finished)


def _works(*what: tuple[str, bytes]) -> list[Work]:
    return [Work(key, Job(rule="cam", source=Source(kind="folder")), data, RULE) for key, data in what]


def test_a_batch_is_answered_job_by_job(supervise: Callable[..., WorkerSupervisor]) -> None:
    supervisor = supervise(extra="max_frames = 3")
    _ready(supervisor)
    assert supervisor.max_frames == 3
    supervisor.submit_batch(_works(("a", b"slow:0.2"), ("b", b"answer"), ("c", b"answer")))
    assert supervisor.health()["jobs"] == ["a", "b", "c"]
    assert supervisor.current == "a and 2 more"
    events = _until(supervisor, lambda e: len(e) == 3)
    assert [(type(e), e.key) for e in events if isinstance(e, Finished)] == [(Finished, k) for k in "abc"]
    # A document's pages may fill the frames the memory was fitted to, at their rule's pixels.
    assert [e.record["timings_ms"]["pages_together"] for e in events if isinstance(e, Finished)] == [3, 3, 3]
    assert supervisor.ready
    pages = RULE.model_copy(update={"max_pixels": 2 * 40_000})
    supervisor.submit_batch([Work("d", Job(rule="cam", source=Source(kind="folder")), b"answer", pages)])
    (event,) = _until(supervisor, lambda e: bool(e))
    assert isinstance(event, Finished)
    assert event.record["timings_ms"]["pages_together"] == 1  # two frames' worth each: one of the three at a time
    with pytest.raises(ValueError, match="1 to 3 jobs"):
        supervisor.submit_batch(_works(*[(k, b"answer") for k in "defg"]))
    assert supervisor.ready, "a refused batch leaves the worker free"


def test_a_crash_in_a_batch_loses_all_its_jobs_and_counts_no_restart(
        supervise: Callable[..., WorkerSupervisor]) -> None:
    supervisor = supervise(extra="max_frames = 3\nmax_restarts = 0")
    _ready(supervisor)
    supervisor.submit_batch(_works(("a", b"answer"), ("poison", b"crash"), ("b", b"answer")))
    (lost,) = _until(supervisor, lambda e: bool(e))
    assert lost == Lost(("a", "poison", "b"), "worker_crashed", "it ended with signal SIGSEGV")
    _ready(supervisor)  # replaced although max_restarts is 0: a death on jobs is theirs, not the worker's
    assert supervisor.gave_up is None


def test_a_stalled_worker_shows_its_stack_then_is_killed(supervise: Callable[..., WorkerSupervisor],
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    supervisor = supervise(extra="stall_timeout = 1")
    _ready(supervisor)
    _submit(supervisor, "stuck", b"hang")
    _until(supervisor, lambda e: supervisor.health()["state"] == "stuck", timeout=10)
    assert not supervisor.healthy(time.monotonic()), "a stuck worker starves the service watchdog"
    (lost,) = _until(supervisor, lambda e: bool(e), timeout=10)
    assert (lost.keys, lost.code, lost.detail) == (("stuck",), "worker_stalled", "no progress for 1 s")
    err = capfd.readouterr().err
    assert 'fakechild.py", line' in err, "the worker's Python stack is in the log before it is killed"
    assert "in _hang" in err
    _ready(supervisor)
    assert supervisor.healthy(time.monotonic())


def test_a_long_job_that_makes_progress_is_not_stalled(supervise: Callable[..., WorkerSupervisor]) -> None:
    supervisor = supervise(extra="stall_timeout = 1")
    _ready(supervisor)
    _submit(supervisor, "long", b"slow:2.5")
    (event,) = _until(supervisor, lambda e: bool(e), timeout=15)
    assert isinstance(event, Finished)


def test_memory_over_the_limit_kills_the_worker_alone(supervise: Callable[..., WorkerSupervisor]) -> None:
    supervisor = supervise(extra='memory_limit = "500MiB"')
    _ready(supervisor)
    _submit(supervisor, "big", b"grow:900")
    (lost,) = _until(supervisor, lambda e: bool(e))
    assert (lost.keys, lost.code) == (("big",), "memory_limit")
    assert "over the limit of 500 MiB" in lost.detail
    _ready(supervisor)


@pytest.mark.parametrize("room", [True, False])
def test_int8_keeps_its_prefill_copy_only_where_the_cap_holds_it(
        room: bool, supervise: Callable[..., WorkerSupervisor], test_model_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(footprint, "prefill_copy_pays", lambda precision: precision == "int8")  # a CPU with AMX
    copy = footprint.estimate(test_model_dir, "int8", 2, 40000, 1, prefill_copy=True)
    alone = footprint.estimate(test_model_dir, "int8", 2, 40000, 1)
    assert copy.total > alone.total
    limit = copy.total if room else copy.total - 1
    supervisor = supervise(extra=f'precision = "int8"\nmax_batch = 2\nmax_frames = 1\nmemory_limit = {limit}')
    request = supervisor._request
    assert request is not None
    assert request.prefill_copy is room  # what the worker is told to load
    _ready(supervisor)


def test_a_worker_outside_the_protocol_is_killed_not_waited_for(
        supervise: Callable[..., WorkerSupervisor]) -> None:
    supervisor = supervise()
    _ready(supervisor)
    _submit(supervisor, "odd", b"garbage")
    (lost,) = _until(supervisor, lambda e: bool(e), timeout=10)
    assert (lost.keys, lost.code) == (("odd",), "worker_crashed")
    _ready(supervisor)


def test_deaths_on_jobs_are_the_jobs_but_idle_deaths_end_the_supervision(
        supervise: Callable[..., WorkerSupervisor]) -> None:
    supervisor = supervise(extra="max_restarts = 1\nrestart_window = 600")
    for i in range(3):
        _ready(supervisor)
        _submit(supervisor, f"bad{i}", b"exit:3")
        (lost,) = _until(supervisor, lambda e: bool(e))
        assert lost.detail == "it ended with exit status 3"
    assert supervisor.gave_up is None, "a stream of bad inputs never ends the daemon"
    for _ in range(2):
        os.kill(_ready(supervisor), signal.SIGKILL)
        _until(supervisor, lambda e: bool(e))
    assert supervisor.gave_up == ("the model worker had to be replaced 2 times within 600 s "
                                  "(model.max_restarts = 1)")


def test_a_model_that_cannot_load_is_fatal(supervise: Callable[..., WorkerSupervisor]) -> None:
    with pytest.raises(ModelError, match="no model here") as fatal:
        _ready(supervise(load="fatal"))
    assert fatal.value.code == "model_missing"


@pytest.mark.parametrize(("load", "extra", "why"), [
    ("crash", "", "it ended with signal SIGSEGV"),
    ("hang", "load_timeout = 1", "still loading after 1 s"),
])
def test_a_worker_that_dies_or_hangs_while_loading_stops_the_start(
        supervise: Callable[..., WorkerSupervisor], load: str, extra: str, why: str) -> None:
    with pytest.raises(ModelError, match=why):
        _ready(supervise(load=load, extra=extra))


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_standby_takes_over_a_lost_worker_and_another_stands_by_once_it_is_ready(
        supervise: Callable[..., WorkerSupervisor], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "edgevl.worker.supervisor")
    supervisor = supervise()
    assert supervisor.health()["standby"] is None, "no standby competes with the first load"
    first = _ready(supervisor)
    standby = supervisor.health()["standby"]
    assert isinstance(standby, int)
    assert standby != first
    assert _running(standby)
    _submit(supervisor, "poison", b"crash")
    (lost,) = _until(supervisor, lambda e: bool(e))
    assert lost.keys == ("poison",)
    assert _ready(supervisor) == standby, "the standby is the replacement"
    assert supervisor.restarts == 1
    assert f"model worker {standby} starting: the standby takes over" in caplog.text
    after = supervisor.health()["standby"]
    assert isinstance(after, int)
    assert after not in (first, standby)
    _submit(supervisor, "next", b"answer")
    assert isinstance(_until(supervisor, lambda e: bool(e))[0], Finished)
    supervisor.__exit__(None, None, None)
    assert not _running(after), "a closed supervisor leaves no standby behind"


def test_a_standby_that_dies_costs_no_restart_and_is_replaced_by_the_next_ready_worker(
        supervise: Callable[..., WorkerSupervisor], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "edgevl.worker.supervisor")
    supervisor = supervise(extra="max_restarts = 0")
    first = _ready(supervisor)
    standby = supervisor.health()["standby"]
    assert isinstance(standby, int)
    os.kill(standby, signal.SIGKILL)
    assert _until(supervisor, lambda e: supervisor.health()["standby"] is None) == []
    assert f"standby worker {standby} ended with signal SIGKILL" in caplog.text
    assert supervisor.gave_up is None
    assert supervisor.restarts == 0
    assert supervisor.ready, "the worker goes on"
    assert supervisor.health()["pid"] == first
    _submit(supervisor, "poison", b"crash")
    _until(supervisor, lambda e: bool(e))
    second = _ready(supervisor)
    assert second not in (first, standby), "without a standby a new process starts"
    assert supervisor.health()["standby"] not in (None, first, standby, second)


@pytest.mark.parametrize("why", ["turned off", "no room"])
def test_no_standby_where_it_is_turned_off_or_the_cap_has_no_room_for_it(
        why: str, supervise: Callable[..., WorkerSupervisor], test_model_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "edgevl.worker.supervisor")
    needed = footprint.estimate(test_model_dir, "float32", 2, 40000, 1)
    extra = ("standby = false" if why == "turned off" else
             f"max_batch = 2\nmax_frames = 1\nmemory_limit = {needed.total + footprint.RUNTIME_BYTES}")
    supervisor = supervise(extra=extra)
    first = _ready(supervisor)
    assert supervisor.health()["standby"] is None
    assert ("no standby (model.standby)" if why == "turned off" else
            "no standby (no room for it under the cap)") in caplog.text
    _submit(supervisor, "poison", b"crash")
    _until(supervisor, lambda e: bool(e))
    assert _ready(supervisor) != first
    assert supervisor.health()["standby"] is None


def test_the_memory_limit_holds_the_standby_too_and_takes_it_before_the_worker(
        supervise: Callable[..., WorkerSupervisor], test_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "edgevl.worker.supervisor")
    needed = footprint.estimate(test_model_dir, "float32", 2, 40000, 1)
    limit = needed.total + int(footprint.RUNTIME_BYTES * footprint.HEADROOM)  # room for a standby, just
    # Sampled: no cgroup in these tests.
    supervisor = supervise(extra=f"max_batch = 2\nmax_frames = 1\nmemory_limit = {limit}")
    worker = _ready(supervisor)
    standby = supervisor.health()["standby"]
    assert isinstance(standby, int)
    worker_rss, standby_rss = memcap.rss_bytes(worker), memcap.rss_bytes(standby)
    assert worker_rss is not None
    assert standby_rss is not None
    # The worker grows to half its standby's size short of the limit: alone it fits, the two do not.
    _submit(supervisor, "big", f"grow:{(limit - worker_rss - standby_rss // 2) >> 20}".encode())
    _until(supervisor, lambda e: supervisor.health()["standby"] is None, timeout=15)
    assert f"standby worker {standby} ended with signal SIGKILL (beside the worker's" in caplog.text
    assert supervisor.busy, "the worker goes on with its job"
    assert supervisor.health()["pid"] == worker


def test_a_worker_ended_by_a_signal_without_a_name_is_reported_by_its_number(
        supervise: Callable[..., WorkerSupervisor]) -> None:
    supervisor = supervise()
    worker = _ready(supervisor)
    _submit(supervisor, "job", b"slow:30")
    os.kill(worker, signal.SIGRTMIN + 3)  # a real-time signal, whose default is to end the process
    (lost,) = _until(supervisor, lambda e: bool(e))
    assert lost == Lost(("job",), "worker_crashed", f"it ended with signal {signal.SIGRTMIN + 3}")
    _ready(supervisor)
