"""The shared-prefix batched engine computes exactly what the model computes on each full prompt."""

from __future__ import annotations

import pytest
import torch

from edgevl.engine.engine import Engine
from edgevl.engine.prompts import chat_text, preprocess_image
from edgevl.questions import Question
from tests.harness.images import noise_image

QUESTIONS = [
    ("Read the label.", 12),
    ("What color is the part on the left of the frame?", 20),
    ("Describe this image", 7),
    ("how many", 30),
    ("Is the connector type-A or type-B? Answer with one of: A, B", 16),
    ("zero", 24),
]


def _full_inputs(lm, question_text: str, image, max_pixels: int) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The model-card way: template, expanded image tokens, the full prompt in one tensor."""
    encoded = preprocess_image(lm, image, max_pixels)
    text = chat_text(lm, question_text, encoded.n_tokens)
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": encoded.pixel_values,
        "image_grid_thw": encoded.grid_thw,
        "mm_token_type_ids": (ids == lm.image_token_id).int(),
    }


def _reference_tokens(lm, question: Question, image, max_pixels: int) -> list[int]:  # type: ignore[no-untyped-def]
    inputs = _full_inputs(lm, question.prompt_text(), image, max_pixels)
    out = lm.model.generate(**inputs, max_new_tokens=question.token_budget, do_sample=False)
    return list(out[0, inputs["input_ids"].shape[1]:].tolist())


@pytest.mark.parametrize(("size", "max_pixels", "max_batch"), [
    ((200, 120), 64 * 64 * 4, 8),
    ((96, 300), 32 * 32 * 16, 8),
    ((640, 360), 448 * 448, 3),  # more rows than the batch: several chunks off one prefix
])
def test_text_answers_are_token_identical_to_generate(fp32_model, size, max_pixels, max_batch) -> None:  # type: ignore[no-untyped-def]
    image = noise_image(*size, seed=size[0])
    questions = [Question(id=f"q{i}", ask=a, type="text", max_tokens=m) for i, (a, m) in enumerate(QUESTIONS)]
    engine = Engine(fp32_model, max_batch=max_batch)
    answered = engine.answer(image, questions, max_pixels)

    lengths = set()
    ended_by_eos = 0
    for q in questions:
        reference = _reference_tokens(fp32_model, q, image, max_pixels)
        assert answered.tokens[q.id] == reference, q.id
        lengths.add(len(reference))
        ended_by_eos += reference[-1] in fp32_model.eos_ids
    # The batch really mixed rows finishing at different steps, some by the end token.
    assert len(lengths) >= 3
    assert ended_by_eos >= 1


def test_yes_no_confidence_is_the_next_token_distribution_of_the_full_prompt(fp32_model) -> None:  # type: ignore[no-untyped-def]
    image = noise_image(160, 160, seed=7)
    questions = [
        Question(id="a", ask="Is there a visible defect on the weld seam?", type="yes_no", alarm_above=0.2),
        Question(id="b", ask="Is the part present?", type="yes_no"),
        Question(id="t", ask="Read the label.", type="text", max_tokens=5),
    ]
    engine = Engine(fp32_model, max_batch=8)
    answered = engine.answer(image, questions, 128 * 128)
    for q in questions[:2]:
        inputs = _full_inputs(fp32_model, q.prompt_text(), image, 128 * 128)
        with torch.inference_mode():
            logits = fp32_model.model(**inputs).logits[0, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        yes = torch.logsumexp(logp[engine.yes_ids], 0)
        no = torch.logsumexp(logp[engine.no_ids], 0)
        expected = float(torch.exp(yes - torch.logaddexp(yes, no)))
        answer = answered.answers[q.id]
        assert answer["p_yes"] == pytest.approx(expected, abs=1e-5)
        assert answer["confidence"] == pytest.approx(max(expected, 1 - expected), abs=1e-5)
        assert answer["value"] is (expected >= 0.5)
        assert answer["text"] == ("yes" if expected >= 0.5 else "no")
        assert answered.scores[q.id][0] == pytest.approx(float(yes - no), abs=1e-4)
    assert answered.answers["a"]["alarm"] is (answered.answers["a"]["p_yes"] > 0.2)
    assert "alarm" not in answered.answers["b"]


def test_choice_probabilities_are_the_full_sequence_likelihoods(fp32_model) -> None:  # type: ignore[no-untyped-def]
    image = noise_image(128, 96, seed=3)
    q = Question(id="c", ask="Which connector type is fitted?", type="choice", options=("type-A", "type-B", "none"))
    answered = Engine(fp32_model, max_batch=8).answer(image, [q], 128 * 128)
    tok = fp32_model.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    scores = []
    for option in q.options:
        inputs = _full_inputs(fp32_model, q.prompt_text(), image, 128 * 128)
        prompt_len = inputs["input_ids"].shape[1]
        extra = tok(option, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([inputs["input_ids"], extra, torch.tensor([[end]])], dim=1)
        inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids),
                      mm_token_type_ids=(ids == fp32_model.image_token_id).int())
        with torch.inference_mode():
            logp = torch.log_softmax(fp32_model.model(**inputs).logits[0].float(), dim=-1)
        targets = ids[0, prompt_len:]
        scores.append(float(logp[prompt_len - 1 : -1].gather(1, targets[:, None]).sum()))
    expected = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()
    answer = answered.answers["c"]
    for option, p in zip(q.options, expected, strict=True):
        assert answer["probabilities"][option] == pytest.approx(p, abs=1e-4)
    assert answer["value"] == q.options[max(range(3), key=lambda i: scores[i])]
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_engine_matches_the_stock_model_card_path(test_model_dir, fp32_model) -> None:  # type: ignore[no-untyped-def]
    """Stock ``from_pretrained`` + ``generate()``: the loader and the packed kernels change no greedy token."""
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    stock = Qwen3VLForConditionalGeneration.from_pretrained(test_model_dir, dtype=torch.float32)
    stock.generation_config = GenerationConfig.from_pretrained(test_model_dir)
    image = noise_image(224, 160, seed=11)
    questions = [Question(id=f"q{i}", ask=a, type="text", max_tokens=m) for i, (a, m) in enumerate(QUESTIONS[:4])]
    answered = Engine(fp32_model, max_batch=8).answer(image, questions, 112 * 112)
    for q in questions:
        inputs = _full_inputs(fp32_model, q.prompt_text(), image, 112 * 112)
        out = stock.generate(**inputs, max_new_tokens=q.token_budget, do_sample=False)
        assert answered.tokens[q.id] == out[0, inputs["input_ids"].shape[1]:].tolist(), q.id
