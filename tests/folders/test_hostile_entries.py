"""No folder entry may stop, hang or blind a real ``edgevl run``: FIFOs, sockets, links to devices,
sparse 50 GB files, names of any bytes, unreadable and re-created inboxes."""

from __future__ import annotations

import base64
import json
import os
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.harness.broker import free_port
from tests.harness.daemon import QUESTIONS, RULES, DaemonProcess
from tests.harness.images import encode, noise_image

pytestmark = pytest.mark.slow


def _jpeg(seed: int, size: tuple[int, int] = (160, 120)) -> bytes:
    return encode(noise_image(*size, seed=seed), "JPEG")


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
    os.symlink(tmp_path / "nothing.jpg", links / "nothing.jpg")
    refused = [inbox / n for n in ("pipe.png", "sock.png", "dir.png", "zero.png", "passwd.png", "dangling.png")]
    refused += [links / "zero.jpg", links / "fifo.jpg", links / "nothing.jpg"]
    d.start()
    try:
        d.wait_notify("READY=1")
        records = d.wait_records(5)
        by_name = {Path(r["source"]["path"]).name: r for r in records}
        assert set(by_name) == {"sparse.png", "caf\\xe9.jpg", long.name, "good.jpg", "linked.jpg"}
        assert by_name["sparse.png"]["error"]["code"] == "file_too_large"
        for name in ("caf\\xe9.jpg", long.name, "good.jpg", "linked.jpg"):
            assert by_name[name]["schema"] == "edgevl.result/2", by_name[name]
        cafe = by_name["caf\\xe9.jpg"]["source"]
        assert base64.b64decode(cafe["path_base64"]) == latin1, "the original name is kept"
        d.quiet(4.5)  # two rescans more
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
        d.quiet(2.5)
        assert len(d.records()) == 6, "a restart meets none of the entries again"
        legacy_record = next(r for r in records if r["job_id"] == legacy.name)
        assert legacy_record["error"]["code"] == "not_a_regular_file"
    finally:
        assert d.stop() == 0


def test_unreadable_and_recreated_inboxes_are_watched_again(tmp_path: Path, test_model_dir: Path) -> None:
    # A share: the rule waits for its folders to be usable instead of refusing to start.
    waiting = RULES.replace('patterns = ["*.jpg", "*.png"]', 'patterns = ["*.jpg", "*.png"]\nmissing_folders = "wait"')
    d = DaemonProcess(tmp_path, test_model_dir, rules=waiting, honour_permissions=True)
    d.config.write_text(d.config.read_text().replace("rescan_interval = 2", "rescan_interval = 600"))
    (d.inbox / "a.jpg").write_bytes(_jpeg(1))
    d.inbox.chmod(0)  # as an EACCES from a share would
    d.start()
    try:
        d.wait_notify("READY=1")
        d.wait_log("cannot be watched: Permission denied")
        d.quiet(2.5)
        assert d.log().count("Permission denied") == 1, "said once, not at every retry"
        d.inbox.chmod(0o755)
        assert d.wait_records(1)[0]["schema"] == "edgevl.result/2"
        assert "can be read again" in d.log()

        # Deleted and made again (a share remounted, a folder replaced): watched again at once,
        # long before the next full rescan.
        os.rename(d.inbox, tmp_path / "old-inbox")
        d.inbox.mkdir()
        (d.inbox / "b.jpg").write_bytes(_jpeg(2))  # before or after the new watch: caught up when it is set
        d.wait_log("was deleted or replaced")
        d.wait_records(2, timeout=15)
        (d.inbox / "c.jpg").write_bytes(_jpeg(3))  # the new watch sees it (the next rescan is 600 s away)
        records = d.wait_records(3, timeout=15)
        assert {Path(r["source"]["path"]).name for r in records} == {"a.jpg", "b.jpg", "c.jpg"}

        # A reload naming an unreadable folder keeps the daemon running.
        locked = tmp_path / "locked"
        locked.mkdir(mode=0)
        d.rules_path.write_text(waiting.format(inbox=d.inbox).replace(f'"{d.inbox}"', f'"{d.inbox}", "{locked}"'))
        d.messages.clear()
        d.signal(1)
        d.wait_notify("READY=1")
        d.wait_log(f"watched folder {locked}: cannot be watched: Permission denied")
        (d.inbox / "d.jpg").write_bytes(_jpeg(4))
        d.wait_records(4)
    finally:
        assert d.stop() == 0


