"""What the kernel says of the CPU (/proc/cpuinfo), read without torch: the daemon imports no torch, and the
engine and the bench name the same fields."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def field(name: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The value of the first line for ``name`` (``vendor_id``, ``model name``, ``flags``), or None where the file
    cannot be read or has no such line (every core's block repeats the same fields)."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() == name:
            return value.strip()
    return None


def has_flag(flag: str, cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU's ``flags`` line names ``flag`` (a whole word: ``amx_int8``, not a longer name); False
    where that cannot be read."""
    return flag in (field("flags", cpuinfo) or "").split()
