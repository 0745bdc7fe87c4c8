"""The shapes of a test model for the int4 precision: the test model's, with every language-model matrix made of
whole groups of 128 inputs (its hidden size 64 has none, so an int4 load of it keeps every layer int8)."""

from __future__ import annotations

import dataclasses

from edgevl.bench.checkpoints import TINY

GROUPED = dataclasses.replace(TINY, hidden=128, intermediate=256, head_dim=32, mrope_section=(4, 6, 6))
