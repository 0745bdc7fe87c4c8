"""The benchmark document names the host's instruction sets, which decide the kernels' speed."""

from __future__ import annotations

import os

import pytest
import torch

from edgevl.bench import host


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2": True}, "AVX2; no AVX-512, VNNI, AVX-VNNI, AVX-512 BF16, AMX"),
    ({"avx2": True, "avx512_f": True, "avx512_vnni": True, "avx512_bf16": True},
     "AVX2, AVX-512, VNNI, AVX-512 BF16; no AVX-VNNI, AMX"),
    ({"avx2": True, "avx512_f": True, "avx512_vnni": True, "avx_vnni": True, "avx512_bf16": True, "amx_int8": True},
     "AVX2, AVX-512, VNNI, AVX-VNNI, AVX-512 BF16, AMX"),
    ({}, "no AVX2; no AVX-512, VNNI, AVX-VNNI, AVX-512 BF16, AMX"),
])
def test_the_instruction_sets_present_and_absent_are_named(flags: dict[str, bool], expected: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_vnni": False, **flags})
    assert host.instruction_sets() == expected
    assert f"({expected});" in host.machine()


def test_a_torch_that_cannot_tell_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown() -> dict[str, bool]:
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(torch.cpu, "get_capabilities", unknown)
    assert host.instruction_sets() == "instruction sets unknown"


def test_this_hosts_line_names_its_cores_and_versions() -> None:
    line = host.machine()
    assert f"torch {torch.__version__};" in line
    assert f"{os.cpu_count()} cores;" in line
    assert "Python 3." in line
