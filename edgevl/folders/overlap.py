"""Rules that would compete for the same files.

The watcher gives a file to the first rule whose folder and patterns take it, so
a second rule watching the same folder (or a subfolder of a recursive one) with a
pattern that can match the same name never answers those files, and nothing says
so. Patterns are compared as the watcher compares them, without regard to case:
two patterns overlap when some name matches both.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from edgevl.rules import Rule


@dataclass(frozen=True)
class _Char:
    """One character of a pattern: a literal, ``?``, or a ``[...]`` set (``negated`` for ``[!...]``)."""

    chars: frozenset[str]
    negated: bool = False


_STAR = None
_ANY = _Char(frozenset(), negated=True)  # "?": every character
Token = _Char | None


def _tokens(pattern: str) -> tuple[Token, ...]:
    """The pattern as fnmatch reads it (``*``, ``?``, ``[seq]``, ``[!seq]``, else a literal)."""
    out: list[Token] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        i += 1
        if c == "*":
            if out and out[-1] is _STAR:
                continue
            out.append(_STAR)
        elif c == "?":
            out.append(_ANY)
        elif c == "[":
            j = i
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            while j < len(pattern) and pattern[j] != "]":
                j += 1
            if j >= len(pattern):
                out.append(_Char(frozenset("[")))  # fnmatch: an unclosed "[" is a literal
                continue
            body, i = pattern[i:j], j + 1
            negated = body.startswith("!")
            out.append(_Char(_expand(body[1:] if negated else body), negated))
        else:
            out.append(_Char(frozenset(c)))
    return tuple(out)


def _expand(body: str) -> frozenset[str]:
    chars: set[str] = set()
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            low, high = ord(body[k]), ord(body[k + 2])
            chars.update(chr(x) for x in range(low, min(high, low + 4096) + 1))
            k += 3
        else:
            chars.add(body[k])
            k += 1
    return frozenset(chars)


def _meet(a: _Char, b: _Char) -> bool:
    """Whether some character is taken by both."""
    if a.negated and b.negated:
        return True  # finitely many characters excluded from infinitely many
    if a.negated:
        return any(c not in a.chars for c in b.chars)
    if b.negated:
        return any(c not in b.chars for c in a.chars)
    return bool(a.chars & b.chars)


def patterns_overlap(first: str, second: str) -> bool:
    """Whether some file name matches both patterns, compared without regard to case."""
    a, b = _tokens(first.lower()), _tokens(second.lower())

    @cache
    def meet(i: int, j: int) -> bool:
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] is _STAR:
            # The star takes nothing, or takes the character b's next token stands for.
            return meet(i + 1, j) or (j < len(b) and meet(i, j + 1))
        if j < len(b) and b[j] is _STAR:
            return meet(i, j + 1) or (i < len(a) and meet(i + 1, j))
        if i == len(a) or j == len(b):
            return False
        x, y = a[i], b[j]
        assert x is not None
        assert y is not None
        return _meet(x, y) and meet(i + 1, j + 1)

    return meet(0, 0)


def overlap_problems(rules: tuple[Rule, ...]) -> list[str]:
    """One line per pair of rules that would compete for files; the first one listed would take them."""
    problems = []
    for n, first in enumerate(rules):
        for second in rules[n + 1:]:
            for f1 in first.folders:
                for f2 in second.folders:
                    a, b = f1.resolve(), f2.resolve()
                    shared = a == b or (first.recursive and a in b.parents) or (second.recursive and b in a.parents)
                    if not shared:
                        continue
                    both = [(p, q) for p in first.patterns for q in second.patterns if patterns_overlap(p, q)]
                    if both:
                        p, q = both[0]
                        problems.append(
                            f'rules "{first.name}" and "{second.name}" both take files like {p!r} / {q!r} in '
                            f"{b if a in b.parents or a == b else a}: only {first.name!r} would ever answer them "
                            "(give them different folders or patterns that cannot match the same name)")
    return problems
