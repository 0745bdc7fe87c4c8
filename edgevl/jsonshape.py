"""Limits on JSON from outside, checked on the raw text before a parser builds anything.

``json.loads`` recurses once per nesting level (a few thousand levels raise
RecursionError, on whichever thread parses) and builds every element it reads
(20 MiB of ``[]`` grow a process by hundreds of megabytes). The envelopes and
requests edgevl accepts are shallow and small, so deeper or larger text is
refused as it is, without parsing it.
"""

from __future__ import annotations

import re

# A whole string (skipped as one token, so that brackets inside strings do not count),
# or one structural character. Unterminated strings fall back to character by
# character, which can only over-count: the text is not valid JSON anyway.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')
_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")


class ShapeError(ValueError):
    """JSON text nested or sized beyond the limits; the message says which."""


def check_shape(data: bytes, max_depth: int, max_items: int) -> None:
    """``ShapeError`` when ``data`` nests arrays and objects deeper than ``max_depth`` or holds
    more than ``max_items`` arrays, objects and elements in all."""
    depth = items = 0
    for match in _TOKENS.finditer(data):
        char = data[match.start()]
        if char in _OPEN:
            depth += 1
            items += 1
            if depth > max_depth:
                raise ShapeError(f"JSON nested deeper than {max_depth} levels")
        elif char in _CLOSE:
            depth -= 1
        elif char == 0x2C:  # ","
            items += 1
        else:
            continue
        if items > max_items:
            raise ShapeError(f"JSON with more than {max_items} elements")
