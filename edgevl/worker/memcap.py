"""The model worker's memory ceiling.

The kernel's own accounting is used where the daemon may create a cgroup: a
cgroup v2 child with ``memory.max`` (under systemd this needs ``Delegate=yes``),
or a cgroup v1 memory group on hosts still on the legacy hierarchy. The kernel
then charges every page the worker touches, and its OOM killer ends the worker
alone the moment it goes over, with no sampling gap.

Elsewhere an RSS watchdog samples the worker's resident size and kills it above
the limit. An address-space rlimit is no substitute: PyTorch, oneDNN and glibc
reserve far more virtual memory than they touch (the benchmark records the
worker's virtual size next to its resident peak), so ``RLIMIT_AS`` either
refuses ordinary allocations or caps nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgevl.config import Enforcement

log = logging.getLogger(__name__)


_PAGE = os.sysconf("SC_PAGE_SIZE")


class CgroupUnavailable(Exception):
    """No cgroup the daemon may create a memory-limited child in; the reason is the message."""


@dataclass
class MemoryCap:
    """How the limit is enforced. ``procs_file`` is where the worker writes its own pid (cgroups only)."""

    limit: int
    kind: str  # "cgroup v2", "cgroup v1" or "rss"
    group: Path | None = None

    @property
    def procs_file(self) -> Path | None:
        return self.group / "cgroup.procs" if self.group else None

    @property
    def kernel_enforced(self) -> bool:
        return self.group is not None

    def describe(self) -> str:
        where = f" ({self.group})" if self.group else ""
        return f"{format_bytes(self.limit)} by {self.kind}{where}"

    def oom_kills(self) -> int:
        """How often the kernel killed a process of the group for memory (0 without a cgroup)."""
        if self.group is None:
            return 0
        name, key = ("memory.events", "oom_kill") if self.kind == "cgroup v2" else ("memory.oom_control", "oom_kill")
        try:
            for line in (self.group / name).read_text().splitlines():
                field, _, value = line.partition(" ")
                if field == key:
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def close(self) -> None:
        if self.group is not None:
            with contextlib.suppress(OSError):
                self.group.rmdir()  # fails harmlessly while a process is still in it


def setup(limit: int, enforcement: Enforcement) -> MemoryCap:
    """Prepare the worker's cap. ``cgroup`` raises ``CgroupUnavailable``; ``auto`` falls back to RSS."""
    if enforcement == "rss":
        return MemoryCap(limit, "rss")
    reasons = []
    for attempt in (_cgroup_v2, _cgroup_v1):
        try:
            return attempt(limit)
        except CgroupUnavailable as exc:
            reasons.append(str(exc))
        except OSError as exc:
            reasons.append(f"{exc.filename or attempt.__name__}: {exc.strerror or exc}")
    if enforcement == "cgroup":
        raise CgroupUnavailable("; ".join(reasons))
    log.info("memory cap by RSS watchdog: no cgroup available (%s)", "; ".join(reasons))
    return MemoryCap(limit, "rss")


def _mounts(fstype: str) -> list[tuple[Path, str, set[str]]]:
    """(mount point, root inside the hierarchy, super options) of each mount of ``fstype``."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            fields, tail = before.split(), after.split()
            if len(tail) >= 3 and tail[0] == fstype:
                found.append((Path(fields[4]), fields[3], set(tail[2].split(","))))
    return found


def _own_cgroup(controller: str) -> str | None:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            names = controllers.split(",") if controllers else []
            if (not controller and not names) or controller in names:
                return path
    return None


def _inside(mount: Path, root: str, path: str) -> Path:
    rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
    if rel.startswith(".."):
        raise CgroupUnavailable(f"our cgroup {path} is outside the mounted hierarchy {root}")
    return mount / rel if rel != "." else mount


def _group_name() -> str:
    return f"edgevl-worker-{os.getpid()}"


def _remove_stale(base: Path) -> None:
    # Left behind by a daemon that was killed; another daemon's live group (its
    # worker may not have joined yet, so it can be empty) is left alone.
    for old in base.glob("edgevl-worker-*"):
        owner = old.name.rpartition("-")[2]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            with contextlib.suppress(OSError):
                old.rmdir()


def _cgroup_v2(limit: int) -> MemoryCap:
    own = _own_cgroup("")
    mounts = _mounts("cgroup2")
    if own is None or not mounts:
        raise CgroupUnavailable("no cgroup v2 hierarchy")
    mount, root, _ = mounts[0]
    base = _inside(mount, root, own)
    if "memory" not in (base / "cgroup.controllers").read_text().split():
        raise CgroupUnavailable(f"{base}: the memory controller is not delegated to us")
    if "memory" not in (base / "cgroup.subtree_control").read_text().split():
        # A cgroup that hands controllers to children may hold no processes
        # itself: the daemon moves into a leaf of its own first.
        leaf = base / "daemon"
        leaf.mkdir(exist_ok=True)
        for pid in (base / "cgroup.procs").read_text().split():
            (leaf / "cgroup.procs").write_text(pid)
        (base / "cgroup.subtree_control").write_text("+memory")
    _remove_stale(base)
    group = base / _group_name()
    group.mkdir(exist_ok=True)
    (group / "memory.max").write_text(str(limit))
    with contextlib.suppress(OSError):
        (group / "memory.swap.max").write_text("0")  # a model paged to swap is a hung model
    with contextlib.suppress(OSError):
        (group / "memory.oom.group").write_text("1")
    return MemoryCap(limit, "cgroup v2", group)


def _cgroup_v1(limit: int) -> MemoryCap:
    own = _own_cgroup("memory")
    mounts = [m for m in _mounts("cgroup") if "memory" in m[2]]
    if own is None or not mounts:
        raise CgroupUnavailable("no cgroup v1 memory hierarchy")
    mount, root, _ = mounts[0]
    base = _inside(mount, root, own)
    _remove_stale(base)
    group = base / _group_name()
    group.mkdir(exist_ok=True)
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
    except OSError:
        with contextlib.suppress(OSError):
            group.rmdir()
        raise
    return MemoryCap(limit, "cgroup v1", group)


def rss_bytes(pid: int) -> int | None:
    """Resident size of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes(pid: int) -> int | None:
    """The highest resident size a process has had (VmHWM), or None when it is gone: a spike between
    two samples still shows."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def own_peak_bytes(field: Literal["VmHWM", "VmPeak"]) -> int:
    """A peak of this process from /proc/self/status: VmHWM (resident) or VmPeak (address space, what
    RLIMIT_AS would have to allow).  Not getrusage's ru_maxrss: Linux carries that over from the
    parent across exec, so a process started by a big parent would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def format_bytes(n: float) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.0f} MiB"
    return f"{n / 1024:.0f} KiB"
