"""A real ``edgevl run`` process with its own notify socket, folders and test model."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

RULES = """
[[rule]]
name = "cam"
folders = ["{inbox}"]
patterns = ["*.jpg", "*.png"]
  [[rule.question]]
  id = "defect"
  ask = "Is there a visible defect?"
  type = "yes_no"
  alarm_above = 0.5
  [[rule.question]]
  id = "label"
  ask = "Read the label."
  max_tokens = 6
"""


def _without_file_permission_override() -> None:
    """In the child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set,
    so that root, too, is refused a folder with mode 000 (as any other user, or a share, would be)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP


# One yes_no question, for rules a test writes itself.
QUESTIONS = """
  [[rule.question]]
  id = "defect"
  ask = "Is there a visible defect?"
  type = "yes_no"
"""


# The folders a test may put elsewhere (a small filesystem, say): the attribute and its key in the file.
_FOLDER_KEYS = {"results": "results", "archive": "archive", "failed": "failed", "state": "state_dir"}


class DaemonProcess:
    def __init__(self, root: Path, model_dir: Path, config_extra: str = "", rules: str = RULES,
                 env: dict[str, str] | None = None, http: str = "", http_extra: str = "",
                 honour_permissions: bool = False) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.results = root / "results"
        self.archive = root / "archive"
        self.failed = root / "failed"
        self.state = root / "state"
        self.rules_path = root / "rules.toml"
        self.rules_path.write_text(rules.format(inbox=self.inbox))
        self.config = root / "edgevl.toml"
        self.config.write_text(f"""
device_id = "test-station"
rules = "rules.toml"
state_dir = "{self.state}"
[model]
id = "{model_dir}"
max_pixels = 40000
threads = 1
# A standby imports torch beside each test's worker, seconds of a core the test does not need; the tests of
# the standby turn it on (EDGEVL_MODEL__STANDBY=true).
standby = false
[folders]
results = "{self.results}"
archive = "{self.archive}"
failed = "{self.failed}"
settle_ms = 300
rescan_interval = 2
[daemon]
status_interval = 0.5
stop_timeout = 30
[http]
listen = "{http}"
{http_extra}
{config_extra}
""")
        self.sock_path = root / "notify.sock"
        self.log_path = root / "daemon.log"
        self.env = env or {}
        self.honour_permissions = honour_permissions
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.messages: list[str] = []

    def move(self, folder: str, path: Path) -> None:
        """Put one of the daemon's folders (``results``, ``archive``, ``failed``, ``state``) at ``path``."""
        key = _FOLDER_KEYS[folder]
        old = getattr(self, folder)
        text = self.config.read_text()
        assert f'{key} = "{old}"' in text
        self.config.write_text(text.replace(f'{key} = "{old}"', f'{key} = "{path}"'))
        setattr(self, folder, path)

    def start(self) -> DaemonProcess:
        self.sock_path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(0.1)
        self.messages = []
        # Drained all the time, as systemd does: a full socket would block the daemon's sd_notify.
        self._reader = threading.Thread(target=self._drain, args=(self.sock,), daemon=True)
        self._reader.start()
        env = {**os.environ, "NOTIFY_SOCKET": str(self.sock_path), "WATCHDOG_USEC": "1000000", **self.env}
        env.pop("JOURNAL_STREAM", None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgevl", "run", "-c", str(self.config)],
                                         stdout=log, stderr=log, env=env,
                                         preexec_fn=_without_file_permission_override if self.honour_permissions
                                         else None)
        return self

    def _drain(self, sock: socket.socket) -> None:
        while self.sock is sock:
            try:
                self.messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def read_notify(self, timeout: float) -> None:
        """Give the daemon ``timeout`` seconds to say more (the reader thread collects it)."""
        time.sleep(timeout)

    def quiet(self, seconds: float) -> None:
        """Let the daemon run (rescans included) for ``seconds``: a test of what must *not* happen
        can only wait; it fails if the daemon exits meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.proc is not None
            assert self.proc.poll() is None, f"the daemon exited ({self.proc.returncode}):\n{self.log()}"
            time.sleep(0.05)

    def wait_notify(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if needle in m:
                    return m
            assert self.proc is not None
            if self.proc.poll() is not None:
                self.read_notify(0.01)
                if any(needle in m for m in self.messages):
                    return next(m for m in self.messages if needle in m)
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before {needle!r}: {self.log()}")
            self.read_notify(0.2)
        raise AssertionError(f"no {needle!r} from the daemon within {timeout} s; log:\n{self.log()}")

    def worker(self) -> tuple[int, str, int]:
        """(pid, state, restarts) of the model worker, from the latest STATUS= that names it."""
        for m in reversed(self.messages):
            found = re.search(r"worker (\d+) (\w+), up \d+ s, restarts (\d+)", m)
            if found:
                return int(found.group(1)), found.group(2), int(found.group(3))
        raise AssertionError(f"no worker status in {self.messages[-5:]}")

    def wait_standby(self, timeout: float = 60) -> int:
        """Wait until the STATUS= line names a standby worker; its pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_notify(0.2)
            for m in reversed(self.messages):
                if "worker " in m:
                    found = re.search(r", standby (\d+)", m)
                    if found:
                        return int(found.group(1))
                    break
        raise AssertionError(f"no standby within {timeout} s: {self.messages[-3:]}")

    def wait_worker(self, state: str, restarts: int | None = None, timeout: float = 60) -> int:
        """Wait until the worker is in ``state`` (with ``restarts`` replacements so far); its pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_notify(0.2)
            try:
                pid, now, count = self.worker()
            except AssertionError:
                continue
            if now == state and (restarts is None or count == restarts):
                return pid
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}); log:\n{self.log()}")
        raise AssertionError(f"worker not {state} (restarts {restarts}) within {timeout} s: "
                             f"{self.messages[-3:]}; log:\n{self.log()}")

    def freeze_worker(self) -> int:
        """Stop the loaded model worker (SIGSTOP): the job it is given next waits, as a long one would.
        Its pid, for ``thaw_worker``."""
        pid = self.wait_worker("ready")
        os.kill(pid, signal.SIGSTOP)
        return pid

    @staticmethod
    def thaw_worker(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for folder, pattern in ((self.results, "*.json"), (self.failed, "*.error.json")):
            for path in sorted(folder.rglob(pattern)) if folder.exists() else []:
                out.append(json.loads(path.read_text()))
        return out

    def wait_records(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.records()
            if len(records) >= count:
                return records
            self.read_notify(0.1)
        raise AssertionError(f"{len(self.records())} of {count} records after {timeout} s; log:\n{self.log()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.read_notify(0.05)
        self.close()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)
        self.close()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            self._reader.join(5)
            sock.close()

    def in_hand(self) -> dict[str, int]:
        """What the daemon noted as in hand (state_dir/in-hand.json)."""
        try:
            held: dict[str, int] = json.loads((self.state / "in-hand.json").read_text())["held"]
            return held
        except (FileNotFoundError, ValueError):
            return {}

    def peak_rss(self) -> int:
        """The daemon's own resident high-water mark (VmHWM), in bytes."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def wait_log(self, needle: str, count: int = 1, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if log.count(needle) >= count:
                return log
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before {needle!r}:\n{log}")
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not {count} times in the log within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
