"""Names from outside turned into names edgevl can record and write.

File names on a share are bytes, not text: an SMB or NFS client with a Latin-1
locale writes ``caf\\xe9.png``, and a camera may use all 255 bytes a name may
have. Records are UTF-8 JSON, and a result's name is longer than its image's
(``<stem>.1.json``, ``<name>.error.json``), so both get a name derived here
while the record keeps the original.
"""

from __future__ import annotations

import base64
import os

NAME_MAX = 255  # bytes of one name on Linux filesystems; folders on others are asked (pathconf)
# Room kept after an output's stem: the counter of a reused name (".99999") and ".error.json".
RESERVED = len(".99999") + len(".error.json")
MAX_SUFFIX = 10  # ".jpeg", ".tiff": longer "suffixes" are part of the stem


def display(path: str) -> tuple[str, str | None]:
    """``path`` as text for records and logs, and the base64 of its bytes when they are not UTF-8.

    Undecodable bytes show as ``\\xNN``; the base64 lets a program find the very file again.
    """
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), base64.b64encode(raw).decode("ascii")


def _clean(text: str) -> str:
    # Control characters and undecodable bytes (U+FFFD after decoding) become "_":
    # they break logs and shell listings, and some shares refuse them.
    return "".join("_" if ord(c) < 32 or c in "\x7f\ufffd" else c for c in text)


def _cut(text: str, limit: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 fits ``limit`` bytes, cut between characters."""
    return text.encode()[:limit].decode("utf-8", "ignore")


def safe_name(name: str, name_max: int = NAME_MAX) -> str:
    """A name for ``name``'s outputs: valid UTF-8, no control characters, no "/", and short enough
    that ``<stem>.<n><suffix>.error.json`` fits ``name_max`` bytes."""
    text = _clean(os.fsencode(name).decode("utf-8", "replace")).replace("/", "_")
    stem, dot, suffix = text.rpartition(".")
    if not dot or not stem or not suffix.isalnum() or len(suffix.encode()) > MAX_SUFFIX - 1:
        stem, suffix = text, ""
    else:
        suffix = "." + suffix
    stem = _cut(stem, max(1, name_max - RESERVED - len(suffix.encode())))
    return (stem or "_") + suffix


def name_max(folder: os.PathLike[str] | str) -> int:
    """Longest name ``folder``'s filesystem allows (255 where it cannot be asked)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return NAME_MAX
