"""Thread count and batch size from the machine's cores."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def default_max_batch(cores: int | None = None) -> int:
    """Rows decoded together.

    Decoding one token is bound by reading the weights from memory, so rows
    ride along almost free until the matrix products become compute-bound:
    about 8 rows on 2 cores, more with more cores.
    """
    cores = cores or usable_cores()
    if cores <= 2:
        return 8
    if cores <= 8:
        return 16
    return 32


def default_max_frames(cores: int | None = None) -> int:
    """Frames answered together when several wait (the stream mode).

    A frame's prefill is compute-bound and gains nothing from company, but its
    answers' decode steps are bound by reading the weights: frames share them
    until their rows fill a decode batch. A frame brings at least one row.
    """
    return default_max_batch(cores)
