"""The host a benchmark run measured: the document's header names it, since figures compare only within one
run and hosts of one CPU name differ in the instructions the kernels use."""

from __future__ import annotations

import os
import platform

from edgevl import cpuinfo
from edgevl.engine.kernels import cpu_capabilities


def machine() -> str:
    """The host's CPU, its instruction sets, cores and the versions that decide its kernels."""
    model = cpuinfo.field("model name") or "unknown CPU"
    import torch
    import transformers

    return (f"{model} ({instruction_sets()}); {os.cpu_count()} cores; torch {torch.__version__};"
            f" transformers {transformers.__version__}; Python {platform.python_version()}")


# The instructions the engine's kernels choose by, as torch reports them: hosts of one CPU name differ in them,
# and figures from hosts that differ in them are not comparable (an AVX2 host ran the same code about half as
# fast as an AVX-512 one).
_INSTRUCTION_SETS = (("avx2", "AVX2"), ("avx512_f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx_vnni", "AVX-VNNI"),
                     ("avx512_bf16", "AVX-512 BF16"), ("amx_int8", "AMX"))


def instruction_sets() -> str:
    """The vector instruction sets of this CPU that the kernels' speed depends on, for the document's header."""
    capabilities = cpu_capabilities()
    if capabilities is None:
        return "instruction sets unknown"
    present = [label for key, label in _INSTRUCTION_SETS if capabilities.get(key)]
    absent = [label for key, label in _INSTRUCTION_SETS[1:] if not capabilities.get(key)]
    return ", ".join(present or ["no AVX2"]) + (f"; no {', '.join(absent)}" if absent else "")
