"""Calibration fits on synthetic scores whose true calibration is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgevl.evaluation.calibration import NoFit, fit_platt, fit_temperature
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
