"""Figures of answers against labels: plain functions over plain lists.

A yes/no question's scores are P(yes) and its labels True for "yes"; an alarm is
raised when P(yes) > alarm_above, as the appliance does.  A figure that the labels
cannot define (an AUC with one class) raises ``Undefined`` with the reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

RELIABILITY_BINS = 10


class Undefined(Exception):
    """The figure has no value for the labels given; the message says why."""


@dataclass(frozen=True)
class Threshold:
    alarm_above: float
    false_alarm_rate: float
    miss_rate: float | None  # None without positive labels
    alarms: int


@dataclass(frozen=True)
class F1Best:
    threshold: float
    f1: float
    precision: float
    recall: float


def _classes(labels: Sequence[bool]) -> tuple[int, int]:
    positives = sum(labels)
    return positives, len(labels) - positives


def accuracy(answers: Sequence[Any], labels: Sequence[Any]) -> float:
    if not labels:
        raise Undefined("no labelled answers")
    return sum(bool(a == b) for a, b in zip(answers, labels, strict=True)) / len(labels)


def confusion(answers: Sequence[str], labels: Sequence[str], classes: Sequence[str]) -> list[list[int]]:
    """Counts with a row per label and a column per answer, both in the order of ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    counts = [[0] * len(classes) for _ in classes]
    for answer, label in zip(answers, labels, strict=True):
        counts[index[label]][index[answer]] += 1
    return counts


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann–Whitney statistic)."""
    positives, negatives = _classes(labels)
    if not positives or not negatives:
        raise Undefined("the labels hold only one class")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum = 0.0
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mean_rank = (i + j) / 2 + 1  # ranks from 1; ties share their mean rank
        rank_sum += mean_rank * sum(labels[order[k]] for k in range(i, j + 1))
        i = j + 1
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> tuple[list[float], list[float], list[float]]:
    """(false-alarm rates, hit rates, thresholds), from alarming on nothing to alarming on everything."""
    positives, negatives = _classes(labels)
    if not positives or not negatives:
        raise Undefined("the labels hold only one class")
    thresholds = sorted(set(scores), reverse=True)
    fpr, tpr, cuts = [0.0], [0.0], [1.0]
    for t in thresholds:
        # The point where every score >= t alarms, i.e. alarm_above just below t.
        fpr.append(sum(s >= t and not y for s, y in zip(scores, labels, strict=True)) / negatives)
        tpr.append(sum(s >= t and y for s, y in zip(scores, labels, strict=True)) / positives)
        cuts.append(t)
    return fpr, tpr, cuts


def brier(scores: Sequence[float], labels: Sequence[bool]) -> float:
    if not labels:
        raise Undefined("no labelled answers")
    return sum((s - float(y)) ** 2 for s, y in zip(scores, labels, strict=True)) / len(labels)


@dataclass(frozen=True)
class Bin:
    low: float
    high: float
    count: int
    mean_score: float
    observed: float  # the share of True labels among the bin's answers


def reliability(scores: Sequence[float], labels: Sequence[bool], bins: int = RELIABILITY_BINS) -> list[Bin]:
    """Equal-width bins over [0, 1]; empty bins are left out."""
    out = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [(s, y) for s, y in zip(scores, labels, strict=True)
                   if low <= s < high or (b == bins - 1 and s == 1.0)]
        if members:
            out.append(Bin(low, high, len(members), sum(s for s, _ in members) / len(members),
                           sum(y for _, y in members) / len(members)))
    return out


def expected_calibration_error(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Σ over bins of (share of answers in the bin) × |observed frequency − mean score|."""
    if not labels:
        raise Undefined("no labelled answers")
    return sum(b.count / len(labels) * abs(b.observed - b.mean_score) for b in reliability(scores, labels))


def _candidates(scores: Sequence[float]) -> list[float]:
    """Every threshold that classifies differently: 0 and each distinct score (alarm when score > t)."""
    return sorted({0.0, *scores})


def _alarms(scores: Sequence[float], labels: Sequence[bool], t: float) -> tuple[int, int]:
    hits = sum(s > t and y for s, y in zip(scores, labels, strict=True))
    false = sum(s > t and not y for s, y in zip(scores, labels, strict=True))
    return hits, false


def _between(cuts: list[float], i: int) -> float:
    """A threshold inside [cuts[i], cuts[i+1]): the midpoint, so that a frame scoring a little
    above a labelled "no" that was kept quiet stays quiet too."""
    if i + 1 >= len(cuts):
        return cuts[i]
    middle = round((cuts[i] + cuts[i + 1]) / 2, 6)
    return middle if cuts[i] <= middle < cuts[i + 1] else cuts[i]


def threshold_for_false_alarms(scores: Sequence[float], labels: Sequence[bool],
                               max_false_alarm_rate: float) -> Threshold:
    """The lowest ``alarm_above`` whose false-alarm rate on the labels is at most the given one:
    the fewest misses that rate allows."""
    positives, negatives = _classes(labels)
    if not negatives:
        raise Undefined("no frame is labelled no, so a false-alarm rate cannot be measured")
    cuts = _candidates(scores)
    for i, t in enumerate(cuts):
        hits, false = _alarms(scores, labels, t)
        if false / negatives <= max_false_alarm_rate:
            return Threshold(_between(cuts, i), false / negatives,
                             (positives - hits) / positives if positives else None, hits + false)
    raise AssertionError("the highest score raises no alarm")  # t = max(scores) alarms on nothing


def rates_at(scores: Sequence[float], labels: Sequence[bool], alarm_above: float) -> Threshold:
    positives, negatives = _classes(labels)
    if not negatives:
        raise Undefined("no frame is labelled no, so a false-alarm rate cannot be measured")
    hits, false = _alarms(scores, labels, alarm_above)
    return Threshold(alarm_above, false / negatives, (positives - hits) / positives if positives else None,
                     hits + false)


def f1_best(scores: Sequence[float], labels: Sequence[bool]) -> F1Best:
    """The threshold with the highest F1 for "yes" (the lowest such threshold on ties)."""
    positives, _ = _classes(labels)
    if not positives:
        raise Undefined("no frame is labelled yes")
    cuts = _candidates(scores)
    best: F1Best | None = None
    for i, t in enumerate(cuts):
        hits, false = _alarms(scores, labels, t)
        if not hits:
            continue
        precision, recall = hits / (hits + false), hits / positives
        f1 = 2 * precision * recall / (precision + recall)
        if best is None or f1 > best.f1:
            best = F1Best(_between(cuts, i), f1, precision, recall)
    if best is None:
        raise Undefined("no threshold finds any frame labelled yes")
    return best


def mean_absolute_error(values: Sequence[float | None], labels: Sequence[float]) -> float:
    pairs = [(v, y) for v, y in zip(values, labels, strict=True) if v is not None]
    if not pairs:
        raise Undefined("no answer held a number")
    return sum(abs(v - y) for v, y in pairs) / len(pairs)


def within_tolerance(values: Sequence[float | None], labels: Sequence[float], tolerance: float) -> float:
    """The share of labelled answers within ``tolerance`` of the label; an answer without a number misses."""
    if not labels:
        raise Undefined("no labelled answers")
    hits = sum(v is not None and math.isfinite(v) and abs(v - y) <= tolerance
               for v, y in zip(values, labels, strict=True))
    return hits / len(labels)


def normalised(value: Any) -> Any:
    """Case and runs of whitespace do not count; applied through JSON values too."""
    if isinstance(value, str):
        return " ".join(value.split()).casefold()
    if isinstance(value, list):
        return [normalised(v) for v in value]
    if isinstance(value, dict):
        return {k: normalised(v) for k, v in value.items()}
    return value


def _canonical(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    # JSON's 1 and 1.0 are one number, but true is not 1.
    return json.dumps(_canonical(a), sort_keys=True) == json.dumps(_canonical(b), sort_keys=True)


def match_rates(values: Sequence[Any], labels: Sequence[Any]) -> tuple[float, float]:
    """(exact, normalised) match shares."""
    if not labels:
        raise Undefined("no labelled answers")
    exact = sum(_same(v, y) for v, y in zip(values, labels, strict=True))
    loose = sum(_same(normalised(v), normalised(y)) for v, y in zip(values, labels, strict=True))
    return exact / len(labels), loose / len(labels)


def field_match(values: Sequence[Any], labels: Sequence[Any]) -> dict[str, float]:
    """For object labels: per key, the share of answers whose value matches (normalised) the label's."""
    totals: dict[str, list[int]] = {}
    for value, label in zip(values, labels, strict=True):
        if not isinstance(label, dict):
            continue
        for key, expected in label.items():
            got = value.get(key) if isinstance(value, dict) else None
            hit = isinstance(value, dict) and key in value and _same(normalised(got), normalised(expected))
            total = totals.setdefault(key, [0, 0])
            total[0] += hit
            total[1] += 1
    return {key: hits / count for key, (hits, count) in sorted(totals.items())}
