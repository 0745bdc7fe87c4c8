"""Fitting a calibration on labelled answers.

yes_no: Platt scaling of the model's yes-vs-no log-odds, with Platt's smoothed
targets, so that labels the model separates perfectly still give a finite slope.
choice: one temperature over the option scores, by the likelihood of the labelled
options.  Both are fitted on the model's raw scores, never on an earlier calibration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from edgevl.questions import sigmoid, softmax

MIN_LABELS = 20
MIN_PER_CLASS = 5


class NoFit(Exception):
    """No calibration can be fitted on these labels; the message says why."""


def _platt_loss(a: float, b: float, x: Sequence[float], t: Sequence[float]) -> float:
    loss = 0.0
    for xi, ti in zip(x, t, strict=True):
        z = a * xi + b
        # log(1 + e^z) − t·z, written to stay finite for large |z|
        loss += max(z, 0.0) + math.log1p(math.exp(-abs(z))) - ti * z
    return loss


def fit_platt(log_odds: Sequence[float], labels: Sequence[bool], enough: bool = True) -> tuple[float, float]:
    """(slope, offset) maximising the likelihood of the labels under P(yes) = sigmoid(slope·x + offset);
    ``enough=False`` (a cross-validation fold) skips the count of labels a proposal needs."""
    positives = sum(labels)
    negatives = len(labels) - positives
    if enough and (len(labels) < MIN_LABELS or positives < MIN_PER_CLASS or negatives < MIN_PER_CLASS):
        raise NoFit(f"a fit needs at least {MIN_LABELS} labelled answers with {MIN_PER_CLASS} of each "
                           f"class; there are {len(labels)} ({positives} yes, {negatives} no)")
    high, low = (positives + 1) / (positives + 2), 1 / (negatives + 2)
    targets = [high if y else low for y in labels]
    a, b = 1.0, 0.0
    loss = _platt_loss(a, b, log_odds, targets)
    for _ in range(100):
        # Newton's method on the two parameters; the loss is convex.
        g_a = g_b = h_aa = h_ab = h_bb = 0.0
        for xi, ti in zip(log_odds, targets, strict=True):
            p = sigmoid(a * xi + b)
            d, w = p - ti, max(p * (1 - p), 1e-12)
            g_a += d * xi
            g_b += d
            h_aa += w * xi * xi
            h_ab += w * xi
            h_bb += w
        h_aa += 1e-9  # keeps the system solvable when every log-odds is the same
        h_bb += 1e-9
        det = h_aa * h_bb - h_ab * h_ab
        step_a = (h_bb * g_a - h_ab * g_b) / det
        step_b = (h_aa * g_b - h_ab * g_a) / det
        scale = 1.0
        while scale > 1e-10:
            na, nb = a - scale * step_a, b - scale * step_b
            new = _platt_loss(na, nb, log_odds, targets)
            if new <= loss:
                break
            scale /= 2
        else:
            break
        a, b, improvement, loss = na, nb, loss - new, new
        if improvement < 1e-12 and abs(g_a) + abs(g_b) < 1e-9:
            break
    if a <= 0:
        raise NoFit(f"the model's P(yes) does not rise with the labelled yes (fitted slope {a:.3g}); "
                           "no calibration can fix an answer that ranks the frames the wrong way")
    return a, b


def _choice_loss(beta: float, scores: Sequence[Sequence[float]], chosen: Sequence[int]) -> float:
    loss = 0.0
    for row, label in zip(scores, chosen, strict=True):
        probs = softmax([beta * s for s in row])
        loss -= math.log(max(probs[label], 1e-300))
    return loss


def fit_temperature(scores: Sequence[Sequence[float]], chosen: Sequence[int], enough: bool = True) -> float:
    """The temperature T maximising the likelihood of the labelled options under softmax(scores / T)."""
    if enough and len(chosen) < MIN_LABELS:
        raise NoFit(f"a fit needs at least {MIN_LABELS} labelled answers; there are {len(chosen)}")
    if len(set(chosen)) < 2:
        raise NoFit("a fit needs labels of at least two different options")
    # The loss is convex in 1/T: golden-section search over log(1/T) in [1/1000, 1000].
    lo, hi = math.log(1e-3), math.log(1e3)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = _choice_loss(math.exp(c), scores, chosen), _choice_loss(math.exp(d), scores, chosen)
    while hi - lo > 1e-6:
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = _choice_loss(math.exp(c), scores, chosen)
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = _choice_loss(math.exp(d), scores, chosen)
    return 1.0 / math.exp((lo + hi) / 2)


FOLDS = 5


def out_of_fold(n: int, fit_predict: Callable[[list[int], list[int]], list[float]], folds: int = FOLDS) -> list[float]:
    """Each item's prediction from a fit on the other folds: what a calibration does on frames it was not
    fitted on. ``fit_predict(train, test)`` gives the predictions for ``test``; ``NoFit`` passes through."""
    predictions = [0.0] * n
    for fold in range(folds):
        test = [i for i in range(n) if i % folds == fold]
        train = [i for i in range(n) if i % folds != fold]
        for i, p in zip(test, fit_predict(train, test), strict=True):
            predictions[i] = p
    return predictions
