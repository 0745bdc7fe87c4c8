"""JSON limits checked on the raw text, against what a parser would build."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevl.jsonshape import ShapeError, check_shape

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=40,
)


def _shape(value: Any, depth: int = 0) -> tuple[int, int]:
    """(depth, arrays + objects + elements beyond the first of each) as the checker counts them."""
    if isinstance(value, list | dict):
        items = list(value.values()) if isinstance(value, dict) else value
        deepest, count = depth + 1, 1 + max(0, len(items) - 1)
        for item in items:
            d, c = _shape(item, depth + 1)
            deepest, count = max(deepest, d), count + c
        return deepest, count
    return depth, 0


@settings(deadline=None)
@given(value=JSON_VALUES)
def test_the_checker_agrees_with_the_parsed_shape(value: Any) -> None:
    text = json.dumps(value).encode()
    depth, items = _shape(value)
    check_shape(text, max(depth, 1), max(items, 1))
    if depth > 1:
        with pytest.raises(ShapeError, match="nested deeper"):
            check_shape(text, depth - 1, 10**9)
    if items > 1:
        with pytest.raises(ShapeError, match="more than"):
            check_shape(text, 10**9, items - 1)


@settings(deadline=None)
@given(data=st.binary(max_size=512))
def test_any_bytes_are_checked_without_other_errors(data: bytes) -> None:
    with contextlib.suppress(ShapeError):
        check_shape(data, 16, 1000)


def test_the_bombs_are_refused_at_once() -> None:
    with pytest.raises(ShapeError, match="nested deeper than 16"):
        check_shape(b"[" * 100_000 + b"]" * 100_000, 16, 10_000)
    with pytest.raises(ShapeError, match="more than 10000"):
        check_shape(b"[" + b"[]," * 7_000_000 + b"[]]", 16, 10_000)
    with pytest.raises(ShapeError, match="more than 10000"):
        check_shape(b"[" + b"1," * 5_000_000 + b"1]", 16, 10_000)
    check_shape(json.dumps({"image": "A" * (20 << 20), "s": "[[[[{{{{"}).encode(), 2, 3)
