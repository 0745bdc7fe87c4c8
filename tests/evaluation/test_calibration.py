"""Calibration fits on synthetic scores whose true calibration is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgevl.evaluation.calibration import NoFit, fit_platt, fit_temperature, out_of_fold
from edgevl.questions import sigmoid, softmax


def test_platt_recovers_a_known_slope_and_offset() -> None:
    rng = np.random.default_rng(1)
    log_odds = rng.normal(0.0, 3.0, 20_000)
    true_slope, true_offset = 0.4, -1.2  # an over-confident model that leans to "yes"
    labels = [bool(rng.random() < sigmoid(true_slope * x + true_offset)) for x in log_odds]
    slope, offset = fit_platt(log_odds.tolist(), labels)
    assert slope == pytest.approx(true_slope, abs=0.03)
    assert offset == pytest.approx(true_offset, abs=0.06)


def test_platt_is_the_likelihood_optimum() -> None:
    # At the optimum the gradient of the loss with Platt's smoothed targets vanishes.
    rng = np.random.default_rng(2)
    log_odds = rng.normal(0.5, 2.0, 60).tolist()
    labels = [bool(rng.random() < sigmoid(1.5 * x)) for x in log_odds]
    slope, offset = fit_platt(log_odds, labels)
    positives = sum(labels)
    high, low = (positives + 1) / (positives + 2), 1 / (len(labels) - positives + 2)
    residuals = [sigmoid(slope * x + offset) - (high if y else low) for x, y in zip(log_odds, labels, strict=True)]
    assert abs(sum(residuals)) < 1e-6
    assert abs(sum(r * x for r, x in zip(residuals, log_odds, strict=True))) < 1e-6


def test_separable_labels_still_give_a_finite_fit() -> None:
    log_odds = [float(x) for x in range(-10, 10)]
    labels = [x > 0 for x in log_odds]
    slope, offset = fit_platt(log_odds, labels)
    assert 0 < slope < 100
    assert math.isfinite(offset)


def test_too_few_labels_or_a_reversed_model_give_a_reason_not_a_fit() -> None:
    with pytest.raises(NoFit, match="at least 20 labelled answers with 5 of each class; there are 19"):
        fit_platt([0.0] * 19, [True] * 10 + [False] * 9)
    with pytest.raises(NoFit, match=r"\(18 yes, 2 no\)"):
        fit_platt([0.0] * 20, [True] * 18 + [False] * 2)
    with pytest.raises(NoFit, match="ranks the frames the wrong way"):
        fit_platt([float(x) for x in range(20)], [x < 10 for x in range(20)])
    with pytest.raises(NoFit, match="at least two different options"):
        fit_temperature([[0.0, 1.0]] * 20, [1] * 20)


def test_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(3)
    true_temperature = 2.5
    scores = rng.normal(0.0, 4.0, (5000, 3))
    chosen = [int(rng.choice(3, p=softmax((row / true_temperature).tolist()))) for row in scores]
    assert fit_temperature(scores.tolist(), chosen) == pytest.approx(true_temperature, rel=0.05)


def test_out_of_fold_predictions_come_from_fits_that_never_saw_them() -> None:
    seen: list[tuple[set[int], set[int]]] = []

    def fit_predict(train: list[int], test: list[int]) -> list[float]:
        seen.append((set(train), set(test)))
        return [float(i) for i in test]

    assert out_of_fold(12, fit_predict) == [float(i) for i in range(12)]
    assert len(seen) == 5
    assert all(not (train & test) and len(train | test) == 12 for train, test in seen)
    assert set().union(*(test for _, test in seen)) == set(range(12))


def test_cross_validated_calibration_is_worse_than_in_sample_on_noise() -> None:
    # Scores that carry no information: a fit on them looks calibrated in sample, not on unseen frames.
    rng = np.random.default_rng(14)  # a draw whose noise happens to rank the right way: a fit is proposed
    log_odds = rng.normal(0, 1, 60).tolist()
    labels = [bool(rng.random() < 0.5) for _ in range(60)]
    slope, offset = fit_platt(log_odds, labels)
    in_sample = sum((sigmoid(slope * x + offset) - y) ** 2 for x, y in zip(log_odds, labels, strict=True)) / 60

    def fold(train: list[int], test: list[int]) -> list[float]:
        a, b = fit_platt([log_odds[i] for i in train], [labels[i] for i in train], enough=False)
        return [sigmoid(a * log_odds[i] + b) for i in test]

    unseen = out_of_fold(60, fold)
    cross = sum((p - y) ** 2 for p, y in zip(unseen, labels, strict=True)) / 60
    assert cross > in_sample
