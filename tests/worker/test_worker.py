"""The model in its own memory-capped worker process: real processes, real kills, the kernel's cgroups."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from edgevl.engine.kernels import int_mm_fast
from edgevl.worker import memcap
from tests.harness.daemon import RULES, DaemonProcess
from tests.harness.images import encode, noise_image

pytestmark = pytest.mark.slow

# A second rule whose images are encoded at 4 M pixels: about 0.9 GB resident
# for the test model, against 0.4 GB for the ordinary rule.
HUGE_RULE = """
[[rule]]
name = "huge"
folders = ["{inbox}/huge"]
patterns = ["*.jpg"]
max_pixels = 4000000
  [[rule.question]]
  id = "defect"
  ask = "Is there a visible defect?"
  type = "yes_no"
"""


def _jpeg(seed: int = 0, size: tuple[int, int] = (160, 120)) -> bytes:
    return encode(noise_image(*size, seed=seed), "JPEG")


def _cgroup_available() -> bool:
    try:
        cap = memcap.setup(1 << 30, "cgroup")
    except memcap.CgroupUnavailable:
        return False
    cap.close()
    return True


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return True  # dead, waiting to be reaped by whoever is its parent now
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_model_that_cannot_fit_is_refused_before_loading(tmp_path: Path, test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir, config_extra="")
    d.config.write_text(d.config.read_text().replace("threads = 1", 'threads = 1\nmemory_limit = "256MiB"'))
    d.start()
    assert d.proc is not None
    assert d.proc.wait(60) == 2
    d.close()
    log = d.log()
    assert f"{test_model_dir} in float32 needs ≈" in log
    assert "model.memory_limit is 256 MiB: raise it" in log
    assert "model worker" not in log, "nothing was started"


@pytest.mark.parametrize("enforcement", ["cgroup", "rss"])
def test_a_job_over_the_memory_limit_kills_only_the_worker(tmp_path: Path, test_model_dir: Path,
                                                           enforcement: str) -> None:
    if enforcement == "cgroup" and not _cgroup_available():
        pytest.skip("no cgroup with a memory controller can be created here")
    d = DaemonProcess(tmp_path, test_model_dir, rules=RULES + HUGE_RULE)
    (d.inbox / "huge").mkdir()
    # max_restarts = 1: the two deaths on the poison image are that image's, not the appliance's.
    d.config.write_text(d.config.read_text().replace(
        "threads = 1", f'threads = 1\nmemory_limit = "640MiB"\nmemory_enforcement = "{enforcement}"\n'
                       "max_restarts = 1"))
    d.start()
    try:
        d.wait_notify("READY=1")
        first = d.wait_worker("ready")
        if enforcement == "cgroup":
            assert "edgevl-worker-" in Path(f"/proc/{first}/cgroup").read_text()
        (d.inbox / "huge" / "big.jpg").write_bytes(_jpeg(7, (4000, 3000)))
        (d.inbox / "after.jpg").write_bytes(_jpeg(8))
        records = d.wait_records(2, timeout=120)
        by_name = {Path(r["source"]["path"]).name: r for r in records}
        big = by_name["big.jpg"]
        assert big["schema"] == "edgevl.error/1"
        assert big["error"]["code"] == "memory_limit"
        assert "2 times" in big["error"]["message"]
        assert by_name["after.jpg"]["schema"] == "edgevl.result/2", "the next job is answered"
        assert (d.failed / "huge" / "big.jpg").exists()
        second = d.wait_worker("ready", restarts=2)
        assert second != first
        assert d.proc is not None
        assert d.proc.poll() is None, "the daemon lives on"
        assert d.log().count("memory_limit (") == 2
    finally:
        assert d.stop() == 0


def test_a_worker_killed_mid_job_is_replaced_and_the_job_answered(tmp_path: Path, test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    d.start()
    try:
        d.wait_notify("READY=1")
        worker = d.freeze_worker()
        (d.inbox / "a.jpg").write_bytes(_jpeg(1))
        assert d.wait_worker("busy") == worker
        assert d.proc is not None
        assert "libtorch" not in _maps(d.proc.pid), "the daemon never loads torch"
        assert "libtorch" in _maps(worker)
        os.kill(worker, signal.SIGKILL)
        (record,) = d.wait_records(1)  # the same job, retried by the new worker
        assert record["schema"] == "edgevl.result/2"
        assert Path(record["source"]["path"]).name == "a.jpg"
        assert "worker_crashed (it ended with signal SIGKILL)" in d.log()
        replacement = d.wait_worker("ready", restarts=1)
        assert replacement != worker
    finally:
        assert d.stop() == 0
    assert _gone(replacement), "a clean stop ends the worker too"


def test_a_standby_imported_in_the_cap_takes_over_a_killed_worker_mid_job(tmp_path: Path,
                                                                         test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir, env={"EDGEVL_MODEL__STANDBY": "true"})
    d.start()
    try:
        d.wait_notify("READY=1")
        worker = d.wait_worker("ready")
        standby = d.wait_standby()
        assert standby != worker
        # It joins the worker's cap (a cgroup where one can be made), then imports torch and the engine.
        assert Path(f"/proc/{standby}/cgroup").read_text() == Path(f"/proc/{worker}/cgroup").read_text()
        deadline = time.monotonic() + 60
        while "libtorch" not in _maps(standby):
            assert time.monotonic() < deadline, "the standby never imported torch"
            time.sleep(0.1)
        # Should the cap run out, the kernel takes the standby first; once it takes over, it is a worker like any.
        score = Path(f"/proc/{worker}/oom_score_adj").read_text()
        assert Path(f"/proc/{standby}/oom_score_adj").read_text() == "1000\n"
        d.freeze_worker()
        (d.inbox / "a.jpg").write_bytes(_jpeg(1))
        assert d.wait_worker("busy") == worker
        os.kill(worker, signal.SIGKILL)
        (record,) = d.wait_records(1)  # the same job, answered by the standby that took over
        assert record["schema"] == "edgevl.result/2"
        assert d.wait_worker("ready", restarts=1) == standby
        assert Path(f"/proc/{standby}/oom_score_adj").read_text() == score
        assert f"model worker {standby} starting: the standby takes over" in d.log()
        assert d.wait_standby() not in (worker, standby), "the new worker gets a standby of its own"
        last = d.wait_standby()
    finally:
        assert d.stop() == 0
    assert _gone(standby)
    assert _gone(last), "a clean stop ends the standby too"


def test_an_int8_worker_prepares_its_weights_once_and_its_replacement_reads_them(tmp_path: Path,
                                                                                 test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir, env={"EDGEVL_MODEL__PRECISION": "int8"})
    d.start()
    try:
        d.wait_notify("READY=1")
        prepared = sorted(p.name for p in (d.state / "prepared").iterdir())
        assert [name.rsplit(".", 1)[1] for name in prepared] == ["bin", "json"]
        assert "its int8 weights are prepared for the next start" in d.log()
        worker = d.worker()[0]
        os.kill(worker, signal.SIGKILL)
        d.wait_worker("ready", restarts=1)
        d.wait_log("from its prepared int8 weights")
        (d.inbox / "a.jpg").write_bytes(_jpeg(2))
        (record,) = d.wait_records(1)
        assert record["model"]["precision"] == "int8"
        if int_mm_fast():
            d.wait_log("layers packed behind the answers")  # in the replacement worker
        else:  # a CPU without VNNI packs each layer as it maps it, before the worker is ready
            assert "layers packed behind the answers" not in d.log()
        assert sorted(p.name for p in (d.state / "prepared").iterdir()) == prepared
    finally:
        assert d.stop() == 0


def test_an_int4_worker_builds_its_kernel_in_the_state_directory_and_answers(tmp_path: Path,
                                                                              grouped_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, grouped_model_dir, env={"EDGEVL_MODEL__PRECISION": "int4"})
    d.start()
    try:
        d.wait_notify("READY=1")
        (kernel,) = (d.state / "kernels").iterdir()
        assert kernel.name.startswith("int4-")
        assert kernel.suffix == ".so"
        assert "its int4 weights are prepared for the next start" in d.log()
        (d.inbox / "a.jpg").write_bytes(_jpeg(3))
        (record,) = d.wait_records(1)
        assert record["model"]["precision"] == "int4"
        assert "error" not in record
        worker = d.worker()[0]
        os.kill(worker, signal.SIGKILL)
        d.wait_worker("ready", restarts=1)
        d.wait_log("from its prepared int4 weights")
        assert [p.name for p in (d.state / "kernels").iterdir()] == [kernel.name], "built once, kept"
    finally:
        assert d.stop() == 0


def test_a_float32_worker_prepares_its_weights_behind_its_answers_and_its_replacement_maps_them(
        tmp_path: Path, test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir, env={"EDGEVL_MODEL__PRECISION": "float32"})
    d.start()
    try:
        d.wait_notify("READY=1")
        assert "its float32 weights are being prepared for the next start" in d.log()
        d.wait_log("float32 weights prepared for the next start")
        prepared = sorted(p.name for p in (d.state / "prepared").iterdir())
        assert [name.rsplit(".", 1)[1] for name in prepared] == ["bin", "json"]
        assert prepared[0].startswith("float32-")
        os.kill(d.worker()[0], signal.SIGKILL)
        d.wait_worker("ready", restarts=1)
        d.wait_log("from its prepared float32 weights")
        (d.inbox / "a.jpg").write_bytes(_jpeg(2))
        (record,) = d.wait_records(1)
        assert record["model"]["precision"] == "float32"
        assert sorted(p.name for p in (d.state / "prepared").iterdir()) == prepared
    finally:
        assert d.stop() == 0


def test_a_hung_worker_starves_the_watchdog_and_is_replaced(tmp_path: Path, test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    d.config.write_text(d.config.read_text().replace("threads = 1", "threads = 1\nstall_timeout = 2"))
    d.start()
    try:
        d.wait_notify("READY=1")
        d.wait_notify("WATCHDOG=1")
        # The signal a stuck worker gets first: the real worker answers it with its Python stacks.
        worker = d.wait_worker("ready")
        os.kill(worker, signal.SIGUSR1)
        d.wait_log('edgevl/worker/child.py", line')
        d.freeze_worker()  # it hangs on the next job: no progress at all
        (d.inbox / "hung.jpg").write_bytes(_jpeg(1))
        d.wait_worker("busy")
        (d.inbox / "ok.jpg").write_bytes(_jpeg(2))  # behind the hung job
        d.wait_worker("stuck")
        d.messages.clear()
        d.quiet(1.0)
        assert d.messages, "status updates continue"
        assert not any("WATCHDOG=1" in m for m in d.messages), "a stuck worker must starve the watchdog"
        records = d.wait_records(2, timeout=60)
        assert {r["schema"] for r in records} == {"edgevl.result/2"}, "the hung job is tried again, then the next"
        d.wait_worker("ready", restarts=1)
        d.messages.clear()
        d.wait_notify("WATCHDOG=1")
        assert d.log().count("is stuck: no progress for 2 s") == 1
        assert "its Python stacks follow, then it is killed" in d.log()
    finally:
        assert d.stop() == 0


def test_too_many_worker_restarts_end_the_daemon_with_failure(tmp_path: Path, test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    d.config.write_text(d.config.read_text().replace(
        "threads = 1", "threads = 1\nmax_restarts = 2\nrestart_window = 600"))
    d.start()
    assert d.proc is not None
    d.wait_notify("READY=1")
    pids = []
    for restarts in range(3):
        pid = d.wait_worker("ready", restarts=restarts)
        pids.append(pid)
        os.kill(pid, signal.SIGKILL)
    assert d.proc.wait(60) == 3
    d.close()
    assert "replaced 3 times within 600 s (model.max_restarts = 2)" in d.log()
    assert all(_gone(pid) for pid in pids)


def test_a_killed_daemon_takes_its_worker_with_it(tmp_path: Path, test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    d.start()
    d.wait_notify("READY=1")
    worker = d.wait_worker("ready")
    d.kill()
    assert _gone(worker), "no orphaned worker holding the model's memory"


def test_a_huge_image_goes_alone_and_its_deaths_cost_the_others_nothing(tmp_path: Path,
                                                                         test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir, rules=RULES + HUGE_RULE)
    (d.inbox / "huge").mkdir()
    d.config.write_text(d.config.read_text().replace(
        "threads = 1", 'threads = 1\nmemory_limit = "640MiB"\nmemory_enforcement = "rss"\nmax_frames = 4\n'
                       "max_restarts = 0"))
    d.start()
    try:
        d.wait_notify("READY=1")
        worker = d.freeze_worker()
        _move_in(d.inbox / "warm.jpg", _jpeg(1))
        d.wait_worker("busy")
        # Moved in while the worker is busy: all four wait, and go to it together once it is free.
        _move_in(d.inbox / "huge" / "big.jpg", _jpeg(7, (4000, 3000)))
        for n in range(3):
            _move_in(d.inbox / f"ok{n}.jpg", _jpeg(10 + n))
        d.wait_notify("queued 5,")
        d.thaw_worker(worker)
        records = {Path(r["source"]["path"]).name: r for r in d.wait_records(5, timeout=180)}
        big = records.pop("big.jpg")
        assert (big["schema"], big["error"]["code"]) == ("edgevl.error/1", "memory_limit")
        assert "2 times" in big["error"]["message"]
        # Its rule's pictures weigh 100 of the four frames the memory was fitted to: it went alone, both times,
        # and the three waiting with it were answered together, never caught in its deaths.
        assert {name: r["schema"] for name, r in records.items()} == {
            name: "edgevl.result/2" for name in ("warm.jpg", "ok0.jpg", "ok1.jpg", "ok2.jpg")}
        log = d.log()
        assert log.count("memory_limit (") == 2
        assert log.count(" lost on job ") == 2
        assert " jobs (" not in log
        assert d.proc is not None
        assert d.proc.poll() is None, "max_restarts = 0 and the daemon lives on: deaths on jobs are theirs"
    finally:
        assert d.stop() == 0


def _move_in(target: Path, data: bytes) -> None:
    """Written as a temporary name in the folder (ignored) and renamed: the watcher sees the rename itself and
    takes the file at once.  A file renamed in from an unwatched folder is reported as created and waits
    ``settle_ms``, so files moved in together could be taken apart."""
    staged = target.with_name(target.name + ".tmp")
    staged.write_bytes(data)
    os.replace(staged, target)
