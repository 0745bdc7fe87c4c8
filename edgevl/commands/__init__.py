"""The ``edgevl`` commands that are not the daemon: ``ask`` and ``check``."""
