"""The figures, each checked against a brute-force computation or a case worked by hand."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgevl.evaluation import metrics

# Scores on a coarse grid so that ties, which real rounded probabilities have, are common.
scores_and_labels = st.lists(
    st.tuples(st.integers(0, 20).map(lambda i: i / 20), st.booleans()), min_size=1, max_size=40)


def _split(pairs: list[tuple[float, bool]]) -> tuple[list[float], list[bool]]:
    return [s for s, _ in pairs], [y for _, y in pairs]


def _brute_rates(scores: list[float], labels: list[bool], t: float) -> tuple[float, float | None]:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    far = sum(s > t for s in neg) / len(neg)
    miss = sum(s <= t for s in pos) / len(pos) if pos else None
    return far, miss


@given(scores_and_labels, st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5]))
def test_alarm_threshold_is_the_fewest_misses_within_the_false_alarm_rate(pairs, max_far) -> None:  # type: ignore[no-untyped-def]
    scores, labels = _split(pairs)
    if all(labels):
        with pytest.raises(metrics.Undefined, match="labelled no"):
            metrics.threshold_for_false_alarms(scores, labels, max_far)
        return
    chosen = metrics.threshold_for_false_alarms(scores, labels, max_far)
    far, miss = _brute_rates(scores, labels, chosen.alarm_above)
    assert (chosen.false_alarm_rate, chosen.miss_rate) == (pytest.approx(far), miss)
    assert far <= max_far
    # No threshold on a fine grid does better: the same or more misses wherever false alarms are allowed.
    for t in [i / 1000 for i in range(1001)]:
        grid_far, grid_miss = _brute_rates(scores, labels, t)
        if grid_far <= max_far and miss is not None:
            assert grid_miss is not None
            assert grid_miss >= miss - 1e-12


@given(scores_and_labels)
def test_roc_auc_is_the_share_of_correctly_ordered_pairs(pairs) -> None:  # type: ignore[no-untyped-def]
    scores, labels = _split(pairs)
    pos = [s for s, y in pairs if y]
    neg = [s for s, y in pairs if not y]
    if not pos or not neg:
        with pytest.raises(metrics.Undefined, match="one class"):
            metrics.roc_auc(scores, labels)
        return
    ordered = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert metrics.roc_auc(scores, labels) == pytest.approx(ordered / (len(pos) * len(neg)))


@given(scores_and_labels)
def test_f1_best_is_the_best_f1_of_any_threshold(pairs) -> None:  # type: ignore[no-untyped-def]
    scores, labels = _split(pairs)
    if not any(labels):
        with pytest.raises(metrics.Undefined):
            metrics.f1_best(scores, labels)
        return
    brute = 0.0
    for t in [i / 1000 for i in range(1001)]:  # alarm_above lies in [0, 1]
        hits = sum(s > t and y for s, y in pairs)
        false = sum(s > t and not y for s, y in pairs)
        if hits:
            p, r = hits / (hits + false), hits / sum(labels)
            brute = max(brute, 2 * p * r / (p + r))
    if brute == 0.0:  # every "yes" scores 0: no alarm_above finds one
        with pytest.raises(metrics.Undefined):
            metrics.f1_best(scores, labels)
        return
    best = metrics.f1_best(scores, labels)
    assert best.f1 == pytest.approx(brute)
    hits = sum(s > best.threshold and y for s, y in pairs)
    assert best.recall == pytest.approx(hits / sum(labels))


def test_threshold_sits_between_scores_so_that_a_nearby_frame_keeps_its_class() -> None:
    scores = [0.1, 0.2, 0.3, 0.8, 0.9]
    labels = [False, False, False, True, True]
    chosen = metrics.threshold_for_false_alarms(scores, labels, 0.0)
    assert chosen.alarm_above == pytest.approx(0.55)
    assert (chosen.false_alarm_rate, chosen.miss_rate, chosen.alarms) == (0.0, 0.0, 2)
    # One "no" scoring above every "yes": no alarm at all keeps the rate at zero.
    strict = metrics.threshold_for_false_alarms([0.2, 0.4, 0.95], [True, True, False], 0.0)
    assert (strict.false_alarm_rate, strict.miss_rate, strict.alarms) == (0.0, 1.0, 0)


def test_calibration_error_and_brier_by_hand() -> None:
    scores = [0.05, 0.15, 0.95, 0.95]
    labels = [False, True, True, True]
    # bins [0,0.1): 1 answer, observed 0, mean 0.05; [0.1,0.2): observed 1, mean 0.15; [0.9,1]: 2, observed 1
    assert metrics.expected_calibration_error(scores, labels) == pytest.approx(
        0.25 * 0.05 + 0.25 * 0.85 + 0.5 * 0.05)
    assert metrics.brier(scores, labels) == pytest.approx((0.05**2 + 0.85**2 + 0.05**2 + 0.05**2) / 4)
    assert [b.count for b in metrics.reliability([0.0, 1.0, 0.5], [False, True, True])] == [1, 1, 1]


def test_confusion_rows_are_labels_and_columns_answers() -> None:
    counts = metrics.confusion(["a", "b", "b", "c"], ["a", "a", "b", "c"], ["a", "b", "c"])
    assert counts == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_numbers_text_and_json() -> None:
    assert metrics.mean_absolute_error([1.0, None, 5.0], [2.0, 3.0, 5.0]) == pytest.approx(0.5)
    assert metrics.within_tolerance([1.0, None, 5.0], [2.0, 3.0, 5.0], 1.0) == pytest.approx(2 / 3)
    with pytest.raises(metrics.Undefined, match="no answer held a number"):
        metrics.mean_absolute_error([None], [1.0])
    assert metrics.match_rates(["Hello  World", "x"], ["hello world", "x"]) == (0.5, 1.0)
    assert metrics.match_rates([{"a": 1}, True], [{"a": 1.0}, 1]) == (0.5, 0.5), "1 is 1.0, true is not 1"
    assert metrics.field_match([{"id": "AB 1", "n": 2}, {"id": "x"}, "not json"],
                               [{"id": "ab 1", "n": 2}, {"id": "y", "n": 1}, {"id": "z"}]) == {
        "id": pytest.approx(1 / 3), "n": 0.5}
