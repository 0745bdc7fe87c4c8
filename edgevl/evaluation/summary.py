"""The ``edgevl.eval/1`` summary: per precision and question, the figures under their plain names.

Probabilities are recomputed from the model's raw scores with the rule's current
calibration, exactly as the appliance would report them; a figure the labels
cannot define is null, with its reason under ``undefined``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from edgevl.evaluation import metrics
from edgevl.evaluation.calibration import NoFit, fit_platt, fit_temperature, out_of_fold
from edgevl.evaluation.labels import LabelledSet
from edgevl.evaluation.runner import Outcome
from edgevl.questions import Calibration, Question, sigmoid, softmax
from edgevl.rules import Rule

SCHEMA = "edgevl.eval/1"


@dataclass(frozen=True)
class Settings:
    max_false_alarm_rate: float = 0.01
    tolerance: float = 0.0
    calibrate: bool = False


class Figures(dict[str, Any]):
    """A question's figures; ``figure`` stores a value or, when it is undefined, null and the reason."""

    def figure(self, name: str, compute: Callable[[], Any]) -> Any:
        try:
            value = compute()
        except metrics.Undefined as why:
            self[name] = None
            self.setdefault("undefined", {})[name] = str(why)
            return None
        self[name] = value
        return value


def p_yes(question: Question, log_odds: float, calibration: Calibration | None = None) -> float:
    calibration = calibration or question.calibration
    return calibration.p_yes(log_odds) if calibration else sigmoid(log_odds)


def option_probabilities(question: Question, scores: Sequence[float],
                         calibration: Calibration | None = None) -> list[float]:
    calibration = calibration or question.calibration
    return calibration.option_probabilities(scores) if calibration else softmax(scores)


def chosen_option(question: Question, outcome: Outcome) -> tuple[int, float]:
    """The option a choice question's answer takes, and its probability (calibrated when the question is)."""
    probabilities = option_probabilities(question, outcome.answered["scores"][question.id])
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return best, probabilities[best]


def labelled_pairs(question: Question, labelled: LabelledSet, results: list[Outcome]) -> list[tuple[Outcome, Any]]:
    """(outcome, label) of every image labelled for ``question`` and answered."""
    return [(o, image.labels[question.id]) for o, image in zip(results, labelled.images, strict=True)
            if question.id in image.labels and o.answered["error"] is None]


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _yes_no(question: Question, pairs: list[tuple[Outcome, Any]], settings: Settings) -> Figures:
    out = Figures()
    log_odds = [o.answered["scores"][question.id][0] for o, _ in pairs]
    labels = [bool(y) for _, y in pairs]
    scores = [p_yes(question, x) for x in log_odds]
    answers = [s >= 0.5 for s in scores]
    words = {True: "yes", False: "no"}
    out.figure("accuracy", lambda: metrics.accuracy(answers, labels))
    out["confusion"] = {"labels": ["yes", "no"], "counts": metrics.confusion(
        [words[a] for a in answers], [words[y] for y in labels], ["yes", "no"])}
    out.figure("roc_auc", lambda: metrics.roc_auc(scores, labels))
    out.figure("brier", lambda: metrics.brier(scores, labels))
    out.figure("expected_calibration_error", lambda: metrics.expected_calibration_error(scores, labels))
    out["reliability"] = [asdict(b) for b in metrics.reliability(scores, labels)]
    out.figure("alarm_threshold", lambda: {
        **asdict(metrics.threshold_for_false_alarms(scores, labels, settings.max_false_alarm_rate)),
        "max_false_alarm_rate": settings.max_false_alarm_rate})
    out.figure("f1_best", lambda: asdict(metrics.f1_best(scores, labels)))
    if question.alarm_above is not None:
        alarm_above = question.alarm_above
        out.figure("configured_alarm", lambda: asdict(metrics.rates_at(scores, labels, alarm_above)))
    if settings.calibrate:
        out["calibration"] = _fit_yes_no(question, log_odds, labels, settings)
    return out


def _fit_yes_no(question: Question, log_odds: list[float], labels: list[bool], settings: Settings) -> dict[str, Any]:
    try:
        slope, offset = fit_platt(log_odds, labels)
    except NoFit as why:
        return {"error": str(why)}
    fitted = Calibration(slope=round(slope, 6), offset=round(offset, 6), labels=len(labels))
    raw = [sigmoid(x) for x in log_odds]
    after = [p_yes(question, x, fitted) for x in log_odds]
    proposal: dict[str, Any] = {
        "slope": fitted.slope, "offset": fitted.offset, "labels": len(labels),
        "brier_raw": metrics.brier(raw, labels), "brier_calibrated": metrics.brier(after, labels),
        "expected_calibration_error_raw": metrics.expected_calibration_error(raw, labels),
        "expected_calibration_error_calibrated": metrics.expected_calibration_error(after, labels),
    }

    def fold(train: list[int], test: list[int]) -> list[float]:
        a, b = fit_platt([log_odds[i] for i in train], [labels[i] for i in train], enough=False)
        return [sigmoid(a * log_odds[i] + b) for i in test]

    _cross_validated(proposal, lambda: out_of_fold(len(labels), fold), labels)
    try:
        threshold = metrics.threshold_for_false_alarms(after, labels, settings.max_false_alarm_rate)
        proposal["alarm_above"] = threshold.alarm_above
        proposal["alarm_threshold"] = asdict(threshold)
    except metrics.Undefined as why:
        proposal["alarm_above"] = None
        proposal.setdefault("undefined", {})["alarm_above"] = str(why)
    return proposal


def _cross_validated(proposal: dict[str, Any], predict: Callable[[], list[float]], truth: list[bool],
                     with_brier: bool = True) -> None:
    """The calibrated figures measured on frames each fit did not see (the in-sample ones flatter it)."""
    figures = {"expected_calibration_error_cross_validated": metrics.expected_calibration_error}
    if with_brier:
        figures["brier_cross_validated"] = metrics.brier
    try:
        predicted = predict()
    except NoFit as why:
        for name in figures:
            proposal[name] = None
            proposal.setdefault("undefined", {})[name] = f"a fold could not be fitted: {why}"
        return
    for name, figure in figures.items():
        proposal[name] = figure(predicted, truth)


def _choice(question: Question, pairs: list[tuple[Outcome, Any]], settings: Settings) -> Figures:
    out = Figures()
    raw_scores = [o.answered["scores"][question.id] for o, _ in pairs]
    labels = [str(y) for _, y in pairs]
    picks = [chosen_option(question, o) for o, _ in pairs]
    best = [b for b, _ in picks]
    confidence = [p for _, p in picks]
    answers = [question.options[b] for b in best]
    correct = [a == y for a, y in zip(answers, labels, strict=True)]
    out.figure("accuracy", lambda: metrics.accuracy(answers, labels))
    out["confusion"] = {"labels": list(question.options),
                        "counts": metrics.confusion(answers, labels, question.options)}
    out.figure("brier", lambda: metrics.brier(confidence, correct))
    out.figure("expected_calibration_error", lambda: metrics.expected_calibration_error(confidence, correct))
    out["reliability"] = [asdict(b) for b in metrics.reliability(confidence, correct)]
    if settings.calibrate:
        try:
            chosen = [question.options.index(y) for y in labels]
            temperature = fit_temperature(raw_scores, chosen)
        except NoFit as why:
            out["calibration"] = {"error": str(why)}
        else:
            fitted = Calibration(temperature=round(temperature, 6), labels=len(labels))
            after = [option_probabilities(question, s, fitted) for s in raw_scores]
            after_conf = [p[b] for p, b in zip(after, best, strict=True)]
            raw_conf = [softmax(s)[b] for s, b in zip(raw_scores, best, strict=True)]
            proposal: dict[str, Any] = {
                "temperature": fitted.temperature, "labels": len(labels),
                "expected_calibration_error_raw": metrics.expected_calibration_error(raw_conf, correct),
                "expected_calibration_error_calibrated": metrics.expected_calibration_error(after_conf, correct),
            }

            def fold(train: list[int], test: list[int]) -> list[float]:
                t = fit_temperature([raw_scores[i] for i in train], [chosen[i] for i in train], enough=False)
                return [softmax([s / t for s in raw_scores[i]])[best[i]] for i in test]

            _cross_validated(proposal, lambda: out_of_fold(len(labels), fold), correct, with_brier=False)
            out["calibration"] = proposal
    return out


def _generated(question: Question, pairs: list[tuple[Outcome, Any]], settings: Settings) -> Figures:
    out = Figures()
    answers = [o.answered["answers"][question.id] for o, _ in pairs]
    labels = [y for _, y in pairs]
    values = [a.get("value") for a in answers]
    out["unparsed"] = sum("error" in a for a in answers)
    if question.type == "number":
        out.figure("mean_absolute_error", lambda: metrics.mean_absolute_error(values, labels))
        out.figure("within_tolerance", lambda: metrics.within_tolerance(values, labels, settings.tolerance))
        out["tolerance"] = settings.tolerance
        return out
    if question.type == "text":
        values = [a.get("text", "") for a in answers]
    try:
        out["exact_match"], out["normalised_match"] = metrics.match_rates(values, labels)
    except metrics.Undefined as why:
        out["exact_match"] = out["normalised_match"] = None
        out["undefined"] = {"exact_match": str(why), "normalised_match": str(why)}
    if question.type == "json":
        out["field_match"] = metrics.field_match(values, labels)
    return out


_BY_TYPE = {"yes_no": _yes_no, "choice": _choice, "number": _generated, "text": _generated, "json": _generated}


def _answer_value(question: Question, outcome: Outcome) -> Any:
    """The answer the appliance would give, for agreement between precisions."""
    if question.type == "yes_no":
        return p_yes(question, outcome.answered["scores"][question.id][0]) >= 0.5
    if question.type == "choice":
        return question.options[chosen_option(question, outcome)[0]]
    return outcome.answered["answers"][question.id].get("value")


def _agreement(question: Question, both: list[tuple[Outcome, Outcome]]) -> Callable[[], float]:
    return lambda: metrics.accuracy([_answer_value(question, o) for o, _ in both],
                                    [_answer_value(question, r) for _, r in both])


def summarise(rule: Rule, labelled: LabelledSet, model: str, outcomes: dict[str, list[Outcome]],
              settings: Settings) -> dict[str, Any]:
    precisions: dict[str, Any] = {}
    reference = outcomes.get("float32")
    for precision, results in outcomes.items():
        answered = [o for o in results if o.answered["error"] is None]
        failed = [{"file": o.file, **o.answered["error"]} for o in results if o.answered["error"] is not None]
        seconds = [o.answered["seconds"] for o in answered]
        questions: dict[str, Any] = {}
        for question in rule.questions:
            pairs = labelled_pairs(question, labelled, results)
            figures = _BY_TYPE[question.type](question, pairs, settings)
            figures = Figures({"type": question.type, "labelled": len(pairs), **figures})
            if reference is not None:
                both = [(o, r) for o, r in zip(results, reference, strict=True)
                        if o.answered["error"] is None and r.answered["error"] is None]
                figures.figure("agreement_with_float32", _agreement(question, both))
            else:
                figures["agreement_with_float32"] = None
                figures.setdefault("undefined", {})["agreement_with_float32"] = "float32 was not evaluated"
            questions[question.id] = figures
        precisions[precision] = {
            "images": len(results), "images_answered": len(answered), "images_failed": len(failed),
            "failed_images": failed,
            "seconds_per_image": sum(seconds) / len(seconds) if seconds else None,
            "answered_now": sum(not o.cached for o in results),
            "questions": questions,
        }
    summary: dict[str, Any] = _rounded({
        "schema": SCHEMA, "rule": rule.name, "labels": str(labelled.source), "model": model,
        "images": len(labelled.images), "max_false_alarm_rate": settings.max_false_alarm_rate,
        "tolerance": settings.tolerance, "precisions": precisions,
    })
    return summary
