"""The greedy choice (edgevl.engine.decoding) is ``generate()``'s: the argmax of the logits themselves, in the
prefill's first token and in every decode step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from edgevl.engine.decoding import PackedSequence
from edgevl.engine.engine import Engine
from edgevl.questions import Question

TOP = 7  # the token one float step above the rest (not an end token of the test model)


def _one_step_above(logits: torch.Tensor) -> torch.Tensor:
    """Every row flat at -1 but ``TOP``, one float step higher: the log-softmax rounds the step away (the
    log-probabilities near -12.9 are coarser than the logits near -1), so an argmax over them would tie every
    token and take the first."""
    flat = torch.full_like(logits, -1.0)
    flat[:, TOP] = torch.nextafter(torch.tensor(-1.0), torch.tensor(0.0))
    return flat


def test_greedy_tokens_are_the_logits_argmax_where_log_probabilities_tie(fp32_model: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = int(fp32_model.model.config.text_config.vocab_size)
    sample = _one_step_above(torch.zeros((1, vocab)))
    assert int(torch.log_softmax(sample, dim=-1).argmax()) == 0  # the tie the choice must not fall into
    assert TOP not in fp32_model.eos_ids
    real = PackedSequence.logits
    monkeypatch.setattr(PackedSequence, "logits", lambda self, hidden: _one_step_above(real(self, hidden)))
    question = Question(id="label", ask="Read the label.", type="text", max_tokens=3)
    answered = Engine(fp32_model).answer(Image.new("RGB", (64, 48), "white"), [question], force_full_length=True)
    # The first token comes from the prefill's pass, the others from decode steps.
    assert answered.tokens["label"] == [TOP, TOP, TOP]
