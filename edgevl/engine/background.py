"""Work a worker does in one background thread while its model already answers: packing its layers
(``edgevl.engine.packing``) and writing its float32 weights for the next start (``edgevl.engine.float32_preparing``).

Both stop between two steps when the process exits: a process that exits while fbgemm packs in another thread is
aborted by the C++ runtime ("terminate called without an active exception"), and a file half written is removed
rather than left behind.  So every start registers a stop with ``atexit``, and the end of the work unregisters it
(nothing is left to stop, and the model is not kept alive by it).
"""

from __future__ import annotations

import atexit
import threading


class BehindTheAnswers:
    """One daemon thread running ``_work``; ``done`` is set when it ends, however it ends.

    ``_work`` checks ``_stopping`` between its steps; ``_release`` wakes a thread that waits before its work.
    """

    def __init__(self, name: str) -> None:
        self.done = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        atexit.register(self.stop)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the step under way."""
        self._stopping.set()
        self._release()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the work has ended (complete, failed or stopped) within ``timeout``."""
        return self.done.wait(timeout)

    def _work(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        """Wake the thread where it waits before its work (nothing to wake unless a subclass waits)."""

    def _main(self) -> None:
        try:
            self._work()
        finally:
            atexit.unregister(self.stop)
            self.done.set()
