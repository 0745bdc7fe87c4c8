"""Pattern overlap, checked against every short name; rules that would compete, named."""

from __future__ import annotations

import fnmatch
import itertools
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from edgevl.folders.overlap import overlap_problems, patterns_overlap
from edgevl.rules import Rule

_PIECES = ["a", "B", "c", "*", "?", "[ab]", "[!a]", "[a-c]", "[", "."]
patterns = st.lists(st.sampled_from(_PIECES), max_size=4).map("".join)
_NAMES = ["".join(p) for n in range(0, 7) for p in itertools.product("abcd[.", repeat=n)]


@given(patterns, patterns)
def test_overlap_is_exactly_a_name_matching_both(first: str, second: str) -> None:
    # The watcher compares lower-cased names with lower-cased patterns.
    def takes(pattern: str, name: str) -> bool:
        return fnmatch.fnmatchcase(name.lower(), pattern.lower())

    witness = any(takes(first, n) and takes(second, n) for n in _NAMES)
    assert patterns_overlap(first, second) == witness, (first, second)


def test_common_cases() -> None:
    assert patterns_overlap("*.jpg", "*.JPG")
    assert patterns_overlap("*.jpg", "cam1_*")
    assert not patterns_overlap("*.jpg", "*.png")
    assert not patterns_overlap("cam1_*.jpg", "cam2_*.jpg")
    assert patterns_overlap("*", "*.tif")


def _rule(name: str, folder: Path, patterns: tuple[str, ...], recursive: bool = False) -> Rule:
    return Rule.model_validate({"name": name, "folders": [folder], "patterns": patterns, "recursive": recursive,
                                "question": [{"id": "q", "ask": "?"}]})


def test_rules_that_compete_for_files_are_named(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    rules = (_rule("jpegs", inbox, ("*.jpg",)), _rule("upper", inbox, ("*.JPG", "*.png")),
             _rule("pngs-below", tmp_path, ("*.png",), recursive=True), _rule("tiffs", inbox, ("*.tif",)),
             _rule("elsewhere", tmp_path / "other", ("*.jpg",)))
    problems = overlap_problems(rules)
    assert len(problems) == 2, problems
    assert problems[0].startswith('rules "jpegs" and "upper" both take files like \'*.jpg\' / \'*.JPG\'')
    assert "only 'jpegs' would ever answer them" in problems[0]
    assert problems[1].startswith('rules "upper" and "pngs-below" both take files like \'*.png\' / \'*.png\'')
