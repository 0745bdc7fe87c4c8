"""The HTML report of ``edgevl eval``: one self-contained file, its plots embedded as PNG.

It is read by an engineer commissioning a rule, often on a laptop away from the
appliance: no scripts, no external assets, nothing fetched when it opens.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on an appliance, and the choice must come before pyplot
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from edgevl.errors import ConfigError
from edgevl.evaluation import metrics
from edgevl.evaluation.labels import LabelledSet
from edgevl.evaluation.runner import Outcome
from edgevl.evaluation.summary import chosen_option, labelled_pairs, p_yes
from edgevl.rules import Rule

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plots img { width: 22em; border: 1px solid #eee; }
.muted { color: #777; }
"""


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(kind: str, title: str, data: str) -> str:
    return (f'<figure><img class="plot" data-plot="{kind}" alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(title)}</figcaption></figure>')


def roc_plot(scores: list[float], labels: list[bool], threshold: float | None) -> str:
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, drawstyle="steps-post", label="ROC")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    if threshold is not None:
        point = metrics.rates_at(scores, labels, threshold)
        hit = 1 - point.miss_rate if point.miss_rate is not None else 0.0
        ax.plot([point.false_alarm_rate], [hit], "o", color="red", label=f"alarm_above {threshold:.3g}")
    ax.set(xlabel="false-alarm rate", ylabel="hit rate", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    return _png(fig)


def reliability_plot(scores: list[float], labels: list[bool], what: str) -> str:
    bins = metrics.reliability(scores, labels)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect")
    ax.bar([(b.low + b.high) / 2 for b in bins], [b.observed for b in bins], width=0.09, alpha=0.6,
           label="observed")
    ax.plot([b.mean_score for b in bins], [b.observed for b in bins], "o-", color="black", label="mean score")
    ax.set(xlabel=what, ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper left")
    return _png(fig)


def confusion_plot(names: list[str], counts: list[list[int]]) -> str:
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(names), 1 + 0.7 * len(names)))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="answer", ylabel="label")
    top = max((c for row in counts for c in row), default=0)
    for r, row in enumerate(counts):
        for c, count in enumerate(row):
            ax.text(c, r, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    return _png(fig)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def _figure_rows(figures: dict[str, Any]) -> str:
    skip = {"confusion", "reliability", "undefined", "type"}
    rows = []
    for name, value in figures.items():
        if name in skip:
            continue
        shown = _value(value) if value is not None else (
            f'<span class="muted">undefined: {html.escape(figures.get("undefined", {}).get(name, ""))}</span>')
        rows.append(f"<tr><th>{html.escape(name)}</th><td>{shown}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def render(summary: dict[str, Any], rule: Rule, labelled: LabelledSet, outcomes: dict[str, list[Outcome]]) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>edgevl eval: "
             f"{html.escape(rule.name)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>Rule {html.escape(rule.name)}</h1>",
             f"<p>{summary['images']} labelled images from {html.escape(summary['labels'])}; model "
             f"{html.escape(summary['model'])}; alarm thresholds for at most "
             f"{summary['max_false_alarm_rate']:.2%} false alarms.</p>"]
    for precision, result in summary["precisions"].items():
        parts.append(f"<section class='precision' id='{html.escape(precision)}'><h2>{html.escape(precision)}</h2>")
        seconds = result["seconds_per_image"]
        parts.append(f"<p>{result['images_answered']} images answered, {result['images_failed']} failed; "
                     f"{_value(seconds) if seconds is not None else '–'} s per image.</p>")
        if result["failed_images"]:
            parts.append("<h3>Images that failed</h3><table id='failed'><tr><th>file</th><th>error</th></tr>")
            parts += [f"<tr><td>{html.escape(f['file'])}</td><td>{html.escape(f['code'])}: "
                      f"{html.escape(f['message'])}</td></tr>" for f in result["failed_images"]]
            parts.append("</table>")
        for question in rule.questions:
            figures = result["questions"][question.id]
            parts.append(f"<section class='question' data-question='{html.escape(question.id)}'>"
                         f"<h3>{html.escape(question.id)} <span class='muted'>({question.type}, "
                         f"{figures['labelled']} labelled)</span></h3>")
            parts.append(_figure_rows(figures))
            parts.append("<div class='plots'>" + "".join(_plots(question.id, figures, rule, labelled,
                                                                 outcomes[precision])) + "</div></section>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _plots(question_id: str, figures: dict[str, Any], rule: Rule, labelled: LabelledSet,
           results: list[Outcome]) -> list[str]:
    question = next(q for q in rule.questions if q.id == question_id)
    out = []
    if "confusion" in figures and figures["labelled"]:
        out.append(_img("confusion", "confusion matrix", confusion_plot(figures["confusion"]["labels"],
                                                                        figures["confusion"]["counts"])))
    if question.type == "yes_no" and figures["labelled"]:
        pairs = labelled_pairs(question, labelled, results)
        scores = [p_yes(question, o.answered["scores"][question.id][0]) for o, _ in pairs]
        labels = [bool(y) for _, y in pairs]
        if figures["roc_auc"] is not None:
            chosen = figures["alarm_threshold"]["alarm_above"] if figures["alarm_threshold"] else None
            out.append(_img("roc", "ROC curve, the proposed alarm_above marked", roc_plot(scores, labels, chosen)))
        out.append(_img("reliability", "reliability of P(yes)", reliability_plot(scores, labels, "P(yes)")))
    elif question.type == "choice" and figures["labelled"]:
        chosen = [(chosen_option(question, o), label) for o, label in labelled_pairs(question, labelled, results)]
        confidence = [p for (_, p), _ in chosen]
        correct = [question.options[best] == label for (best, _), label in chosen]
        out.append(_img("reliability", "reliability of the chosen option's probability",
                        reliability_plot(confidence, correct, "probability of the chosen option")))
    return out


def write_report(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the report: {exc.strerror or exc}") from None
