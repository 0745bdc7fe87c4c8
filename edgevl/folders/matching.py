"""Which files of the watched folders belong to which rule, and which names are never taken.

Hidden and temporary names are a writer's work in progress (``.upload``,
``x.part``, ``~$doc``): they are never taken, and folders with hidden names are
never descended into.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from edgevl.rules import Rule

TEMPORARY = ("*.tmp", "*.part", "~$*", "*.crdownload", "*.partial", "*.swp")


def ignored_name(name: str) -> bool:
    lower = name.lower()
    return name.startswith(".") or any(fnmatch.fnmatchcase(lower, p) for p in TEMPORARY)


def rule_for(rules: tuple[Rule, ...], path: Path) -> Rule | None:
    """The first rule whose folders and patterns take ``path``."""
    if ignored_name(path.name):
        return None
    name = path.name.lower()
    for rule in rules:
        for folder in rule.folders:
            inside = path.parent == folder or (rule.recursive and folder in path.parents)
            if inside and any(fnmatch.fnmatchcase(name, p.lower()) for p in rule.patterns):
                if any(part.startswith(".") for part in path.relative_to(folder).parts):
                    return None
                return rule
    return None
