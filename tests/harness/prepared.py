"""What the tests of a start from prepared weights share: the questions its model answers, and how much of a
prepared file the test's own process has mapped."""

from __future__ import annotations

from pathlib import Path

from edgevl.engine.engine import Engine
from edgevl.engine.loading import LoadedModel
from edgevl.questions import Question
from tests.harness.images import noise_image

QUESTIONS = [
    Question(id="d", ask="Is there a defect?", type="yes_no"),
    Question(id="c", ask="Which type?", type="choice", options=("A", "B", "C")),
    Question(id="t", ask="Read the label.", max_tokens=6),
]


def answer(lm: LoadedModel) -> tuple[object, object]:
    """The tokens and scores of one image's answers to ``QUESTIONS``: compared exactly between loads."""
    answered = Engine(lm).answer(noise_image(96, 80, seed=4), QUESTIONS, 96 * 96)
    return answered.tokens, answered.scores


def mapped_ranges(path: Path) -> int:
    """How many of this process's mappings are of ``path``."""
    return sum(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())
