"""Outputs can never feed inputs: folders edgevl writes must not be folders it watches.

A results, archive or failed folder (or the state directory) inside a watched
folder would have edgevl take its own output as input: every record and
archived image answered again, for ever. ``edgevl check``, ``edgevl run`` and a
rules reload refuse such a layout, naming both folders.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from edgevl.config import Config
from edgevl.folders.matching import ignored_name
from edgevl.rules import RulesFile


def _outputs(config: Config) -> dict[str, Path]:
    folders = config.folders
    named = {"folders.results": folders.results, "folders.archive": folders.archive,
             "folders.failed": folders.failed, "state_dir": config.state_dir}
    return {key: path.resolve() for key, path in named.items() if path is not None}


def layout_problems(config: Config, rules: RulesFile) -> list[str]:
    """One line per output folder that a rule's watched folder would read."""
    problems = []
    outputs = _outputs(config)
    for rule in rules.rules:
        for folder in rule.folders:
            watched = folder.resolve()
            for key, out in outputs.items():
                where = f"the watched folder {folder} of rule {rule.name}"
                if out == watched or out in watched.parents:
                    problems.append(f"{where} is inside {key} {out}: edgevl would take its own output as input")
                    continue
                if watched not in out.parents:
                    continue
                parts = out.relative_to(watched).parts
                if any(ignored_name(part) for part in parts):
                    continue  # hidden folders are never read
                if rule.recursive:
                    why = "which is recursive"
                elif any(fnmatch.fnmatchcase(parts[0].lower(), p.lower()) for p in rule.patterns):
                    why = f"whose patterns match {parts[0]!r}"
                else:
                    continue
                problems.append(f"{key} {out} is inside {where}, {why}: edgevl would take its own output as input")
    return problems
