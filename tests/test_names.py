"""Names of any bytes turned into names edgevl can record and write."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from edgevl.names import RESERVED, display, safe_name

NAME_BYTES = st.binary(min_size=1, max_size=255).filter(lambda b: b"/" not in b and b"\0" not in b
                                                       and b not in (b".", b".."))


def test_display_and_safe_names_of_named_cases() -> None:
    latin1 = os.fsdecode(b"caf\xe9.png")
    shown, raw = display("/srv/in/" + latin1)
    assert shown == "/srv/in/caf\\xe9.png"
    assert raw is not None
    assert base64.b64decode(raw) == b"/srv/in/caf\xe9.png"
    assert display("/srv/in/ok.png") == ("/srv/in/ok.png", None)
    assert safe_name(latin1) == "caf_.png"
    assert safe_name("a\nb\x7f.JPG") == "a_b_.JPG"
    long = "x" * 251 + ".png"
    assert len(long.encode()) == 255
    cut = safe_name(long)
    assert cut.endswith(".png")
    assert len((Path(cut).stem + ".99999.png.error.json").encode()) <= 255
    assert safe_name("archive.tar.verylongsuffix") == "archive.tar.verylongsuffix"
    assert safe_name("é" * 200 + ".png").encode().decode() == safe_name("é" * 200 + ".png")  # cut between characters


@settings(deadline=None)
@given(raw=NAME_BYTES)
def test_any_name_gives_a_writable_utf8_name_and_keeps_the_original(raw: bytes) -> None:
    name = os.fsdecode(raw)
    safe = safe_name(name)
    encoded = safe.encode("utf-8")  # valid UTF-8: no lone surrogates
    assert b"/" not in encoded
    assert not any(c < 32 or c == 127 for c in encoded)
    stem, suffix = Path(safe).stem, Path(safe).suffix
    assert len((stem + ".99999" + suffix + ".error.json").encode()) <= 255
    assert len(encoded) + RESERVED <= 255 + len(suffix.encode()) + 1
    shown, original = display(name)
    shown.encode("utf-8")
    assert (base64.b64decode(original) if original else shown.encode()) == raw
