"""The int4 precision's test helpers: the shapes of its test model (the test model's, with every language-model
matrix made of whole groups of 128 inputs: its hidden size 64 has none, so an int4 load of it keeps every layer
int8), and the instruction sets its C library can be held to here."""

from __future__ import annotations

import ctypes
import dataclasses

from edgevl.bench.checkpoints import TINY
from edgevl.engine import int4_kernel

GROUPED = dataclasses.replace(TINY, hidden=128, intermediate=256, head_dim=32, mrope_section=(4, 6, 6))


def levels(lib: ctypes.CDLL) -> list[int]:
    """The instruction sets the int4 library's kernels can use on this CPU, plain C always among them."""
    return list(range(int4_kernel.level(lib) + 1))
