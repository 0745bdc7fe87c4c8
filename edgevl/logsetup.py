"""Logging to journald with structured fields under systemd, to stderr otherwise."""

from __future__ import annotations

import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


def setup_logging(level: str = "info") -> None:
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM"):
        # stderr is the journal: send native entries so that EDGEVL_JOB,
        # EDGEVL_RULE and EDGEVL_IMAGE (given as ``extra=``) become fields.
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="edgevl")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
