"""Prompts exactly as the model's chat template makes them, split at the end of the image.

Every question's prompt is ``template(user: [image, question]) + generation
prompt``.  Everything up to ``<|vision_end|>`` is the same for all questions of
an image (the shared prefix); the rest is each question's suffix.  Positions
come from the model's own 3-D RoPE index of the full prompt, so the cached
prefix plus a suffix sees exactly the positions the full prompt would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from edgevl.engine.loading import LoadedModel
from edgevl.errors import ModelError


@dataclass(frozen=True)
class EncodedImage:
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor  # (1, 3)
    n_tokens: int  # image tokens in the prompt after spatial merging


@dataclass(frozen=True)
class QuestionPrompt:
    prefix_ids: list[int]
    suffix_ids: list[int]
    prefix_positions: torch.Tensor  # (3, len(prefix)) multimodal RoPE positions
    suffix_positions: torch.Tensor  # (3, len(suffix))

    @property
    def full_ids(self) -> list[int]:
        return self.prefix_ids + self.suffix_ids


def preprocess_image(lm: LoadedModel, image: Image.Image, max_pixels: int) -> EncodedImage:
    """Resize (keeping the aspect ratio, at most ``max_pixels``) and patchify one image."""
    proc = lm.image_processor
    min_pixels = min(int(proc.size.shortest_edge or 0) or max_pixels, max_pixels)
    out = proc(images=[image], size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, return_tensors="pt")
    grid = out["image_grid_thw"]
    merge = int(lm.config.vision_config.spatial_merge_size)
    return EncodedImage(out["pixel_values"], grid, int(grid.prod().item()) // (merge * merge))


def chat_text(lm: LoadedModel, question_text: str, n_image_tokens: int) -> str:
    """The full prompt text with the image placeholder expanded to one token per image embedding."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question_text}]}]
    text: str = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pad = lm.tokenizer.convert_ids_to_tokens(lm.image_token_id)
    if text.count(pad) != 1:
        raise ModelError("the chat template must place exactly one image in the prompt", "model_unsupported")
    return text.replace(pad, pad * n_image_tokens)


def rope_positions(model: Any, ids: list[int], image_token_id: int, grid_thw: torch.Tensor) -> torch.Tensor:
    """The model's own (3, len(ids)) multimodal positions for a prompt with one image."""
    input_ids = torch.tensor([ids])
    types = (input_ids == image_token_id).int()
    positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=grid_thw)
    result: torch.Tensor = positions[:, 0, :]
    return result


def build_prompt(lm: LoadedModel, question_text: str, image: EncodedImage) -> QuestionPrompt:
    ids: list[int] = lm.tokenizer(chat_text(lm, question_text, image.n_tokens), add_special_tokens=False)[
        "input_ids"
    ]
    try:
        split = len(ids) - ids[::-1].index(lm.vision_end_id)
    except ValueError:
        raise ModelError("the prompt has no <|vision_end|> token", "model_unsupported") from None
    positions = rope_positions(lm.model, ids, lm.image_token_id, image.grid_thw)
    return QuestionPrompt(ids[:split], ids[split:], positions[:, :split], positions[:, split:])


def continuation_ids(lm: LoadedModel, prompt_text: str, answer: str) -> list[int]:
    """Tokens of ``answer`` as the assistant would write it after the prompt, plus the end of turn."""
    tok = lm.tokenizer
    base = tok(prompt_text, add_special_tokens=False)["input_ids"]
    full = tok(prompt_text + answer, add_special_tokens=False)["input_ids"]
    tail = full[len(base):] if full[: len(base)] == base else tok(answer, add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    return [*tail, end] if isinstance(end, int) and end >= 0 else list(tail)
