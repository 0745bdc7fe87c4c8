"""At start, before anything else runs: set aside every input that was in hand at two consecutive deaths.

A death of the daemon with an input in hand (a crash in native code, the
kernel's OOM killer, the service watchdog ending a hang) is counted by the
in-hand ledger (``edgevl.spool.hand``). An input met by ``POISON_DEATHS`` deaths in
a row is given a ``quarantined`` error record here, under a name made from its
job key alone, so that systemd never restarts edgevl into it again. An input
that stopped the daemon even while being quarantined is hidden and never
touched again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edgevl.folders.matching import rule_for
from edgevl.names import display
from edgevl.records import now_rfc3339
from edgevl.rules import RulesFile
from edgevl.spool.claim import claim
from edgevl.spool.hand import POISON_DEATHS, Hand
from edgevl.spool.job import POISON_PREFIX
from edgevl.spool.store import Spool

log = logging.getLogger(__name__)


def quarantine_poison(hand: Hand, spool: Spool, rules: RulesFile, device_id: str) -> None:
    for key, deaths in hand.poisoned():
        kind, _, name = key.partition(":")
        message = (f"edgevl stopped {deaths} times in a row while it handled this input; it was set aside so "
                   "that it cannot stop edgevl again")
        log.error("%s was in hand at %d consecutive stops of edgevl: quarantined", display(name)[0], deaths)
        with hand.holding(key):
            try:
                if kind == "mqtt":
                    hand.mark_poison(key)  # answered with an error record when the broker sends it again
                elif kind == "job":
                    _job(spool, name, deaths, message, device_id)
                elif kind == "file":
                    _file(spool, rules, Path(name), deaths, message, device_id)
            except OSError as exc:
                log.error("cannot quarantine %s now: %s", display(name)[0], exc.strerror or exc)


def _job(spool: Spool, key: str, deaths: int, message: str, device_id: str) -> None:
    if not (spool.root / key).is_dir():
        return
    if deaths > POISON_DEATHS:  # even its quarantine stopped edgevl
        log.error("spool job %s stopped edgevl even when quarantined; kept as %s for a person to look at",
                  key, spool.set_aside(key))
        return
    spool.quarantine(key, device_id, "quarantined", message)


def _file(spool: Spool, rules: RulesFile, path: Path, deaths: int, message: str, device_id: str) -> None:
    if not os.path.lexists(path):
        return
    if deaths > POISON_DEATHS:
        hidden = path.with_name(POISON_PREFIX + path.name)
        os.rename(path, hidden)
        log.error("%s stopped edgevl even when quarantined; renamed to %s, which is never taken",
                  display(str(path))[0], display(str(hidden))[0])
        return
    rule = rule_for(rules.rules, path)
    if rule is not None:
        claim(spool, path, rule.name, now_rfc3339(), int(rule.max_bytes), device_id=device_id,
              quarantine=("quarantined", message))
