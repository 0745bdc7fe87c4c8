"""Batched answering from a shared, cached image prefix.

The prefix (system/user header, the image's embeddings) is prefilled once per
image.  Each row is one thing to compute from it: a question's next-token
distribution (yes/no), the likelihood of one choice option, or a greedy
generation.  Rows are right-padded to a common length and run as one batch over
copies of the prefix cache; a 2-D attention mask hides the padding, and each
row carries its own 3-D RoPE positions, so every row computes what its own
unpadded full prompt would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache

from edgevl.engine.loading import LoadedModel
from edgevl.engine.prompts import EncodedImage

RowKind = Literal["next", "sequence", "generate"]


@dataclass
class Row:
    """One sequence continuing the shared prefix."""

    tokens: list[int]  # suffix tokens fed after the prefix
    positions: torch.Tensor  # (3, len(tokens)) RoPE positions
    kind: RowKind
    score_from: int = 0  # sequence rows: tokens[score_from:] are scored
    max_new: int = 0  # generate rows
    # results
    logprobs: torch.Tensor | None = None  # next rows: log-softmax over the vocabulary
    score: float = 0.0  # sequence rows: summed log-likelihood
    generated: list[int] = field(default_factory=list)
    finished_by_eos: bool = False


@dataclass
class Prefix:
    cache: DynamicCache
    length: int


def _lm(lm: LoadedModel) -> Any:
    return lm.model.model.language_model


@torch.inference_mode()
def encode_prefix(lm: LoadedModel, image: EncodedImage, prefix_ids: list[int], positions: torch.Tensor) -> Prefix:
    """Run the vision encoder and prefill the prompt up to the end of the image."""
    model = lm.model
    ids = torch.tensor([prefix_ids])
    text_model = _lm(lm)
    embeds = text_model.embed_tokens(ids)
    features = model.model.get_image_features(image.pixel_values, image.grid_thw, return_dict=True)
    image_embeds = torch.cat(list(features.pooler_output), dim=0).to(embeds.dtype)
    deepstack = [torch.cat(list(f), dim=0).to(embeds.dtype) for f in features.deepstack_features]
    mask = ids == lm.image_token_id
    if int(mask.sum()) != image_embeds.shape[0]:
        raise RuntimeError("image token count does not match the image embeddings")
    embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), image_embeds)
    length = len(prefix_ids)
    position_ids = torch.cat([torch.arange(length).view(1, 1, -1), positions.view(3, 1, -1)], dim=0)
    cache = DynamicCache(config=model.config.text_config)
    text_model(
        inputs_embeds=embeds,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        visual_pos_masks=mask,
        deepstack_visual_embeds=deepstack,
    )
    return Prefix(cache, length)


def _copy_cache(prefix: Prefix, rows: int, config: Any) -> DynamicCache:
    cache = DynamicCache(config=config)
    for index, layer in enumerate(prefix.cache.layers):
        cache.update(
            layer.keys.expand(rows, -1, -1, -1).contiguous(),
            layer.values.expand(rows, -1, -1, -1).contiguous(),
            index,
        )
    return cache


def _forward(lm: LoadedModel, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             cache: DynamicCache, start: int) -> torch.Tensor:
    text_model = _lm(lm)
    length = ids.shape[1]
    # Row 0 of the position ids is the cache slot (used for the causal mask);
    # rows 1-3 are the rotary positions each row's own prompt would have.
    slots = torch.arange(start, start + length).view(1, 1, -1).expand(1, ids.shape[0], -1)
    position_ids = torch.cat([slots, positions], dim=0)
    out = text_model(
        inputs_embeds=text_model.embed_tokens(ids),
        position_ids=position_ids,
        attention_mask=mask,
        cache=cache,
        use_cache=True,
    )
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


def _logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    logits: torch.Tensor = lm.model.lm_head(hidden)
    return logits.float()


@torch.inference_mode()
def run_rows(lm: LoadedModel, prefix: Prefix, rows: list[Row], max_batch: int) -> None:
    """Compute every row's result from the prefix, ``max_batch`` rows at a time."""
    # Generation rows go first so that they share chunks and decode together.
    order = sorted(range(len(rows)), key=lambda i: rows[i].kind != "generate")
    for start in range(0, len(order), max_batch):
        _run_chunk(lm, prefix, [rows[i] for i in order[start : start + max_batch]])


def _run_chunk(lm: LoadedModel, prefix: Prefix, rows: list[Row]) -> None:
    batch = len(rows)
    width = max(len(r.tokens) for r in rows)
    ids = torch.full((batch, width), lm.pad_id, dtype=torch.long)
    positions = torch.zeros((3, batch, width), dtype=torch.long)
    mask = torch.zeros((batch, prefix.length + width), dtype=torch.long)
    mask[:, : prefix.length] = 1
    for b, row in enumerate(rows):
        n = len(row.tokens)
        ids[b, :n] = torch.tensor(row.tokens)
        positions[:, b, :n] = row.positions
        positions[:, b, n:] = row.positions[:, -1:]
        mask[b, prefix.length : prefix.length + n] = 1
    cache = _copy_cache(prefix, batch, lm.model.config.text_config)
    hidden = _forward(lm, ids, positions, mask, cache, prefix.length)

    generating: list[int] = []
    for b, row in enumerate(rows):
        n = len(row.tokens)
        if row.kind == "sequence":
            # Logits at t predict token t+1: score tokens[score_from:].
            logp = torch.log_softmax(_logits(lm, hidden[b, row.score_from - 1 : n - 1]), dim=-1)
            targets = torch.tensor(row.tokens[row.score_from :])
            row.score = float(logp.gather(1, targets[:, None]).sum())
            continue
        logp = torch.log_softmax(_logits(lm, hidden[b, n - 1]), dim=-1)
        if row.kind == "next":
            row.logprobs = logp
        else:
            token = int(logp.argmax())
            row.generated.append(token)
            row.finished_by_eos = token in lm.eos_ids
            if not row.finished_by_eos and len(row.generated) < row.max_new:
                generating.append(b)
    if generating:
        _decode(lm, rows, generating, cache, mask, prefix.length + width)


def _decode(lm: LoadedModel, rows: list[Row], active: list[int], cache: DynamicCache,
            mask: torch.Tensor, slot: int) -> None:
    """Greedy decoding of the active rows; finished rows leave the batch."""
    if len(active) != len(rows):
        cache.batch_select_indices(torch.tensor(active))
        mask = mask[active]
    next_pos = {b: int(rows[b].positions[0, -1]) + 1 for b in active}
    while active:
        ids = torch.tensor([[rows[b].generated[-1]] for b in active])
        pos = torch.tensor([next_pos[b] for b in active]).view(1, -1, 1).expand(3, -1, -1)
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype)], dim=1)
        hidden = _forward(lm, ids, pos, mask, cache, slot)
        slot += 1
        tokens = _logits(lm, hidden[:, -1]).argmax(dim=-1).tolist()
        keep = []
        for i, b in enumerate(active):
            row = rows[b]
            row.generated.append(int(tokens[i]))
            next_pos[b] += 1
            row.finished_by_eos = tokens[i] in lm.eos_ids
            if not row.finished_by_eos and len(row.generated) < row.max_new:
                keep.append(i)
        if len(keep) != len(active):
            if keep:
                cache.batch_select_indices(torch.tensor(keep))
                mask = mask[keep]
            active = [active[i] for i in keep]
