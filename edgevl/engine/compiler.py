"""The system's C compiler, which precision int4 builds its kernel with (``edgevl.engine.int4_kernel``); found
without torch, so that ``edgevl check`` and the daemon can name a missing one before a worker is started."""

from __future__ import annotations

import os
import shutil


def c_compiler() -> str | None:
    """``$CC``, else ``cc``, else ``gcc`` on the PATH; None where there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
