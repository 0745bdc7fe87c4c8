"""No single folder entry may stop, hang or blind a real ``edgevl run``: FIFOs, sockets, links to devices,
sparse 50 GB files, names of any bytes, unreadable and re-created inboxes, a full state directory, and an
input that was in hand at two deaths of the daemon."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.broker import free_port
from tests.conftest import fill
from tests.daemonharness import RULES, DaemonProcess
from tests.imagegen import encode, noise_image

pytestmark = pytest.mark.slow

QUESTIONS = """
  [[rule.question]]
  id = "defect"
  ask = "Is there a visible defect?"
  type = "yes_no"
"""


def _jpeg(seed: int, size: tuple[int, int] = (160, 120)) -> bytes:
    return encode(noise_image(*size, seed=seed), "JPEG")


def _quiet(d: DaemonProcess, seconds: float) -> None:
    """Let the daemon run (rescans included) for ``seconds``: for what must *not* happen."""
    d.read_notify(seconds)


def _no_links_under(*folders: Path) -> None:
    for folder in folders:
        for entry in folder.rglob("*") if folder.exists() else []:
            assert not entry.is_symlink(), f"{entry} is a link"


def test_hostile_entries_never_stop_hang_or_blind_the_daemon(tmp_path: Path, test_model_dir: Path) -> None:
    port = free_port()
    d = DaemonProcess(tmp_path, test_model_dir, http=f"127.0.0.1:{port}")
    inbox, links = d.inbox, tmp_path / "links"
    links.mkdir()
    d.rules_path.write_text(f'[[rule]]\nname = "cam"\nfolders = ["{inbox}"]\npatterns = ["*"]\n{QUESTIONS}'
                            f'[[rule]]\nname = "links"\nfolders = ["{links}"]\nfollow_symlinks = true\n{QUESTIONS}')
    os.mkfifo(inbox / "pipe.png")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(inbox / "sock.png"))
    (inbox / "dir.png").mkdir()
    os.symlink("/dev/zero", inbox / "zero.png")
    os.symlink("/etc/passwd", inbox / "passwd.png")
    os.symlink("/nonexistent/x", inbox / "dangling.png")
    with (inbox / "sparse.png").open("wb") as f:
        f.truncate(50 << 30)
    latin1 = os.fsencode(inbox) + b"/caf\xe9.jpg"  # as an SMB client with a Latin-1 locale names it
    with open(latin1, "wb") as f:
        f.write(_jpeg(1))
    long = inbox / ("x" * 251 + ".jpg")  # 255 bytes: the most a name may have
    long.write_bytes(_jpeg(2))
    (inbox / "good.jpg").write_bytes(_jpeg(3))
    (tmp_path / "elsewhere.jpg").write_bytes(_jpeg(4))
    os.symlink(tmp_path / "elsewhere.jpg", links / "linked.jpg")
    os.symlink("/dev/zero", links / "zero.jpg")
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "fifo", links / "fifo.jpg")
    refused = [inbox / n for n in ("pipe.png", "sock.png", "dir.png", "zero.png", "passwd.png", "dangling.png")]
    refused += [links / "zero.jpg", links / "fifo.jpg"]
    d.start()
    try:
        d.wait_notify("READY=1")
        records = d.wait_records(5)
        by_name = {Path(r["source"]["path"]).name: r for r in records}
        assert set(by_name) == {"sparse.png", "caf\\xe9.jpg", long.name, "good.jpg", "linked.jpg"}
        assert by_name["sparse.png"]["error"]["code"] == "file_too_large"
        for name in ("caf\\xe9.jpg", long.name, "good.jpg", "linked.jpg"):
            assert by_name[name]["schema"] == "edgevl.result/1", by_name[name]
        cafe = by_name["caf\\xe9.jpg"]["source"]
        assert base64.b64decode(cafe["path_base64"]) == latin1, "the original name is kept"
        _quiet(d, 4.5)  # two rescans more
        log = d.log()
        for entry in refused:
            assert log.count(f"not taking {entry}:") == 1, (entry, log)
            assert os.path.lexists(entry), "never taken, never moved"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            assert json.loads(resp.read())["ok"] is True
        assert d.peak_rss() < 500 << 20, "nothing was read whole"
        assert len(d.records()) == 5

        # A reload that would make an output an input is refused, naming both folders.
        d.rules_path.write_text(f'[[rule]]\nname = "cam"\nfolders = ["{d.archive}/cam"]\n{QUESTIONS}')
        d.signal(1)  # SIGHUP
        d.wait_log("reload refused")
        assert f"the watched folder {d.archive}/cam of rule cam is inside folders.archive" in d.log()
    finally:
        assert d.stop() == 0
    short = "x" * (255 - len(".99999.jpg.error.json")) + ".json"  # the stem cut so that every output fits
    assert sorted(p.name for p in (d.results / "cam").iterdir()) == sorted(["caf_.json", "good.json", short])
    assert all(len(p.name.encode()) <= 255 for p in d.results.rglob("*"))
    sparse = d.failed / "cam" / "sparse.png"
    assert os.stat(sparse).st_blocks == 0, "moved, never read or filled"
    _no_links_under(d.results, d.archive, d.failed)

    # An older spool may hold a FIFO: the restart ends it with an error record instead of hanging on it.
    legacy = d.state / "spool" / "0000000000000001cafecafe"
    legacy.mkdir()
    (legacy / "job.json").write_text(json.dumps({"job_id": legacy.name, "rule": "cam", "name": "pipe.png",
                                                 "received_at": "t", "source": {"kind": "folder", "path": "/x"}}))
    os.mkfifo(legacy / "image.png")
    d.rules_path.write_text(f'[[rule]]\nname = "cam"\nfolders = ["{inbox}"]\npatterns = ["*"]\n{QUESTIONS}')
    d.start()
    try:
        d.wait_notify("READY=1")
        records = d.wait_records(6)
        _quiet(d, 2.5)
        assert len(d.records()) == 6, "a restart meets none of the entries again"
        legacy_record = next(r for r in records if r["job_id"] == legacy.name)
        assert legacy_record["error"]["code"] == "not_a_regular_file"
    finally:
        assert d.stop() == 0


def _kill_while_copying(d: DaemonProcess, timeout: float = 60) -> dict[str, int]:
    """Start the daemon, kill -9 it while it copies a file into its spool; what it had in hand."""
    d.start()
    assert d.proc is not None
    fds = Path(f"/proc/{d.proc.pid}/fd")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            copying = any(os.readlink(fd).endswith(".copy.part") for fd in fds.iterdir())
        except OSError:
            copying = False  # a descriptor closed while it was looked at
        if copying:
            d.kill()
            return d.in_hand()
        time.sleep(0.002)
    raise AssertionError(f"no copy within {timeout} s:\n{d.log()}")


def test_an_input_in_hand_at_two_deaths_is_quarantined_and_never_met_again(tmp_path: Path, test_model_dir: Path,
                                                                           big_tmpfs: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    share = big_tmpfs / "share"  # another filesystem: the file is copied into the spool, which takes a while
    share.mkdir()
    d.rules_path.write_text(RULES.format(inbox=d.inbox) + f'[[rule]]\nname = "share"\nfolders = ["{share}"]\n'
                            f'patterns = ["*.jpg"]\n{QUESTIONS}')
    with (share / "huge.jpg").open("wb") as f:
        for _ in range(16):
            f.write(b"\xff" * (64 << 20))  # 1 GiB of data, no holes
    # Killed twice while that copy is under way (as the OOM killer or the service watchdog would):
    # first while it is taken, then while the next start copies it in again.
    first = _kill_while_copying(d)
    assert set(first) == {f"file:{share / 'huge.jpg'}", next(k for k in first if k.startswith("job:"))}
    job_key = next(k for k in first if k.startswith("job:"))
    assert not (share / "huge.jpg").exists(), "taken: it waits in the claim folder"
    assert _kill_while_copying(d) == {job_key: 1}, "the same input, one death so far"
    (d.inbox / "after.jpg").write_bytes(_jpeg(5))
    d.start()
    try:
        d.wait_notify("READY=1")
        records = d.wait_records(2)
        by_rule = {r["rule"]: r for r in records}
        quarantined = by_rule["share"]
        assert quarantined["error"]["code"] == "quarantined"
        assert quarantined["job_id"] == job_key.removeprefix("job:")
        assert "stopped 2 times in a row" in quarantined["error"]["message"]
        kept = share / f".edgevl-poison-{quarantined['job_id']}.jpg"
        assert f"the file is kept as {kept}" in quarantined["error"]["message"]
        assert kept.stat().st_size == 1 << 30
        assert by_rule["cam"]["schema"] == "edgevl.result/1", "the daemon keeps answering"
        assert "quarantined" in d.log()
    finally:
        assert d.stop() == 0
    d.start()
    try:
        d.wait_notify("READY=1")
        _quiet(d, 2.5)
        assert len(d.records()) == 2, "a restart never meets it again"
        assert d.in_hand() == {}
    finally:
        assert d.stop() == 0


def test_unreadable_and_recreated_inboxes_are_watched_again(tmp_path: Path, test_model_dir: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir, honour_permissions=True)
    d.config.write_text(d.config.read_text().replace("rescan_interval = 2", "rescan_interval = 600"))
    (d.inbox / "a.jpg").write_bytes(_jpeg(1))
    d.inbox.chmod(0)  # as an EACCES from a share would
    d.start()
    try:
        d.wait_notify("READY=1")
        d.wait_log("cannot be watched: Permission denied")
        _quiet(d, 2.5)
        assert d.log().count("Permission denied") == 1, "said once, not at every retry"
        d.inbox.chmod(0o755)
        assert d.wait_records(1)[0]["schema"] == "edgevl.result/1"
        assert "can be read again" in d.log()

        # Deleted and made again (a share remounted, a folder replaced): watched again at once,
        # long before the next full rescan.
        os.rename(d.inbox, tmp_path / "old-inbox")
        d.inbox.mkdir()
        d.wait_log("was deleted or replaced")
        time.sleep(1.5)  # the new folder's watch is set within a second
        (d.inbox / "b.jpg").write_bytes(_jpeg(2))
        records = d.wait_records(2, timeout=15)
        assert {Path(r["source"]["path"]).name for r in records} == {"a.jpg", "b.jpg"}

        # A reload naming an unreadable folder keeps the daemon running.
        locked = tmp_path / "locked"
        locked.mkdir(mode=0)
        d.rules_path.write_text(RULES.format(inbox=d.inbox).replace(f'"{d.inbox}"', f'"{d.inbox}", "{locked}"'))
        d.messages.clear()
        d.signal(1)
        d.wait_notify("READY=1")
        d.wait_log(f"watched folder {locked}: cannot be watched: Permission denied")
        (d.inbox / "c.jpg").write_bytes(_jpeg(3))
        d.wait_records(3)
    finally:
        assert d.stop() == 0


def test_a_full_state_directory_leaves_files_in_their_inbox(tmp_path: Path, test_model_dir: Path,
                                                            small_tmpfs: Path) -> None:
    d = DaemonProcess(tmp_path, test_model_dir)
    d.state = small_tmpfs / "state"
    d.config.write_text(d.config.read_text().replace(f'state_dir = "{tmp_path / "state"}"',
                                                     f'state_dir = "{d.state}"'))
    d.start()
    try:
        d.wait_notify("READY=1")
        filler = fill(small_tmpfs)
        with filler.open("r+b") as f:
            f.truncate(filler.stat().st_size - (64 << 10))  # room for a job's description, not its image
        image = d.inbox / "frame.jpg"
        image.write_bytes(_jpeg(7, (640, 480)))
        assert image.stat().st_size > 128 << 10, "more than the room left"
        d.wait_log("cannot take")
        assert "No space left on device; it stays in its folder" in d.log()
        assert image.exists(), "back under its own name"
        assert not list((d.inbox / ".edgevl-claim").iterdir())
        filler.unlink()
        records = d.wait_records(1)
        assert records[0]["schema"] == "edgevl.result/1"
    finally:
        assert d.stop() == 0
