"""The folders on disk: outputs never feed inputs, and every watched folder can be used.

A results, archive or failed folder (or the state directory) inside a watched
folder would have edgevl take its own output as input: every record and
archived image answered again, for ever. A watched folder that is missing or
that edgevl may not write would leave its rule silently idle. ``edgevl check``,
``edgevl run`` and a rules reload refuse both, naming the folders.
"""

from __future__ import annotations

import fnmatch
import os
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


def folder_problems(rules: RulesFile) -> list[str]:
    """Watched folders run could not use: missing (unless the rule creates or waits for them), not a folder,
    or not writable (files are renamed out of them into the spool)."""
    problems = []
    for rule in rules.rules:
        for folder in rule.folders:
            where = f'rule "{rule.name}": the watched folder {folder}'
            if rule.missing_folders == "wait":
                continue  # a share: watched once it is there and usable, and the log says what it waits for
            if not folder.exists():
                if rule.missing_folders == "refuse":
                    problems.append(f"{where} does not exist (create it, or set missing_folders = \"create\", "
                                    f"or \"wait\" for a share mounted later)")
                continue
            if not folder.is_dir():
                problems.append(f"{where} is not a folder")
            elif not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
                problems.append(f"{where} cannot be read and written by this user (images are moved out of it)")
    return problems


def create_folders(rules: RulesFile) -> None:
    """The watched folders of rules with ``missing_folders = "create"``, made where missing."""
    for rule in rules.rules:
        if rule.missing_folders == "create":
            for folder in rule.folders:
                folder.mkdir(parents=True, exist_ok=True)
