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


CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def last_level_cache_bytes(caches: Path = CACHES) -> int | None:
    """The size of the first core's largest cache level (its ``index*/level`` and ``size``, e.g. ``32768K``), or
    None where the kernel does not say."""
    best: tuple[int, int] | None = None
    try:
        entries = sorted(caches.glob("index*"))
    except OSError:
        return None
    for entry in entries:
        try:
            level = int((entry / "level").read_text(encoding="ascii").strip())
            size = (entry / "size").read_text(encoding="ascii").strip().upper()
            number, unit = (size[:-1], size[-1]) if size[-1:] in _UNITS else (size, "")
            found = (level, int(number) * _UNITS[unit])
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if found[1] > 0 and (best is None or found > best):
            best = found
    return None if best is None else best[1]
