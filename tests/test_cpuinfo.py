"""The CPU's fields read from the kernel's cpuinfo file, without torch."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgevl import cpuinfo

BLOCK = ("processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
         "flags\t\t: fpu avx2 avx512f amx_tile amx_int8\n\n")


def test_the_first_cores_fields_are_read(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(BLOCK.format(n=0) + BLOCK.format(n=1))
    assert cpuinfo.field("vendor_id", path) == "GenuineIntel"
    assert cpuinfo.field("model name", path) == "Intel(R) Xeon(R) Processor"
    assert cpuinfo.field("processor", path) == "0"
    assert cpuinfo.field("model", path) is None  # a whole key, not the start of one
    assert cpuinfo.has_flag("amx_int8", path)
    assert not cpuinfo.has_flag("amx", path)  # a whole word of the flags
    assert not cpuinfo.has_flag("avx512_vnni", path)


def test_a_missing_file_reads_as_nothing(tmp_path: Path) -> None:
    assert cpuinfo.field("vendor_id", tmp_path / "absent") is None
    assert not cpuinfo.has_flag("avx2", tmp_path / "absent")
    assert cpuinfo.field("flags", tmp_path) is None  # a directory


@given(st.binary(max_size=400))
def test_any_bytes_read_as_a_field_or_nothing_never_an_error(tmp_path_factory: pytest.TempPathFactory,
                                                             data: bytes) -> None:
    path = tmp_path_factory.mktemp("cpu") / "cpuinfo"
    path.write_bytes(data)
    for name in ("vendor_id", "flags", "model name"):
        value = cpuinfo.field(name, path)
        assert value is None or value == value.strip()
    assert isinstance(cpuinfo.has_flag("amx_int8", path), bool)


def test_this_host_names_its_vendor_where_the_kernel_has_the_file() -> None:
    if cpuinfo.CPUINFO.exists():
        assert cpuinfo.field("vendor_id") in ("GenuineIntel", "AuthenticAMD", "HygonGenuine", "CentaurHauls")


def _cache(root: Path, index: int, level: str, size: str) -> None:
    entry = root / f"index{index}"
    entry.mkdir()
    (entry / "level").write_text(level + "\n")
    (entry / "size").write_text(size + "\n")


def test_the_last_level_cache_is_the_highest_level_named(tmp_path: Path) -> None:
    _cache(tmp_path, 0, "1", "32K")  # data
    _cache(tmp_path, 1, "1", "32K")  # instructions
    _cache(tmp_path, 2, "2", "1024K")
    _cache(tmp_path, 3, "3", "32768K")
    assert cpuinfo.last_level_cache_bytes(tmp_path) == 32 << 20
    (tmp_path / "index3" / "size").write_text("300M\n")
    assert cpuinfo.last_level_cache_bytes(tmp_path) == 300 << 20
    (tmp_path / "index3" / "size").write_text("garbled\n")  # a level it cannot read is passed over
    assert cpuinfo.last_level_cache_bytes(tmp_path) == 1 << 20
    assert cpuinfo.last_level_cache_bytes(tmp_path / "absent") is None


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_any_cache_files_read_as_a_size_or_nothing_never_an_error(tmp_path_factory: pytest.TempPathFactory,
                                                                  level: bytes, size: bytes) -> None:
    entry = tmp_path_factory.mktemp("cache") / "index0"
    entry.mkdir()
    (entry / "level").write_bytes(level)
    (entry / "size").write_bytes(size)
    found = cpuinfo.last_level_cache_bytes(entry.parent)
    assert found is None or found > 0
