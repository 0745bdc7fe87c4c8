"""Answering many questions from one cached image prefix, in one packed sequence.

The prefix (prompt header and the image's embeddings) is prefilled once.  Every
question's suffix, every choice option and every generated token is then
appended to that same single-row KV cache, and a tree-shaped attention mask
lets each token see only the prefix and its own branch (its question's suffix,
its option or its own earlier answer tokens).  Each token carries the 3-D RoPE
position its own full prompt would give it, so every branch computes what the
model computes on that question alone, without padding and without copying the
prefix cache per question.

Rows waiting to be generated share forward passes: up to ``max_batch`` branches
decode together, and a finished branch's place is taken by a waiting one.

Several frames share the decoding the same way (the stream mode): each frame's
prefix and questions are prefilled alone, exactly as a lone frame's, then the
frames' caches are laid end to end, each followed by room for its own answers'
tokens; a branch sees only its own frame's slots, so the frames' answers share
every decode step (each reads the weights once for all frames), each frame's
rows attend over its own span alone, and each computes what it would compute
alone.  Prefilling alone
keeps each suffix token's attention to its own frame's few hundred slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache

from edgevl.engine import spans, textpass
from edgevl.engine.grammar import Constraint
from edgevl.engine.kvcache import join, new_cache, stored_dtype
from edgevl.engine.loading import LoadedModel
from edgevl.engine.packing import answer_threads
from edgevl.engine.prompts import EncodedImage

BranchKind = Literal["next", "choice", "generate"]
# Suffix tokens prefilled per forward pass at most: bounds activation memory
# when a rule has many long questions.
PREFILL_TOKENS = 1024


@dataclass
class Branch:
    """One question's continuation of the shared prefix."""

    kind: BranchKind
    tokens: list[int]  # the question's suffix
    positions: torch.Tensor  # (3, len(tokens)) RoPE positions
    options: list[list[int]] = field(default_factory=list)  # choice: tokens of each option
    max_new: int = 0
    ignore_eos: bool = False  # benchmark: decode exactly max_new tokens
    constraint: Constraint | None = None  # generate: the grammar its tokens must follow
    # results
    logprobs: torch.Tensor | None = None  # next: log-softmax after the suffix
    scores: list[float] = field(default_factory=list)  # choice: log-likelihood per option
    generated: list[int] = field(default_factory=list)
    finished_by_eos: bool = False  # ended by an end token, or by completing its grammar
    # layout in the packed cache
    prefix: tuple[int, int] = (0, 0)  # the slots of its frame's prefix, set by prefill_branches
    slots: list[int] = field(default_factory=list)


@dataclass
class DecodeStats:
    steps: int = 0
    seconds: float = 0.0


@dataclass
class _Token:
    token: int
    position: int | torch.Tensor  # int for text (all three axes equal), else a (3,) tensor
    context: list[int]  # cache slots it attends to besides the prefix, itself included
    prefix: tuple[int, int]  # its frame's prefix: the slots [start, end) it attends to


@dataclass
class _Room:
    """A frame's place in a joined cache: its span starts at ``start``; its answers' tokens fill
    ``[next, end)``."""

    start: int
    next: int
    end: int


class PackedSequence:
    """The single-row KV cache: a frame's prefix first, then branches appended in any order; joined (the
    stream mode), each frame's cache followed by the room its answers' tokens fill."""

    def __init__(self, lm: LoadedModel, cache: DynamicCache, prefix_length: int,
                 on_step: Callable[[], None] = lambda: None) -> None:
        self.lm = lm
        self.cache = cache
        self.prefixes = [(0, prefix_length)]  # each frame's slots [start, end)
        self.length = prefix_length  # slots written (a lone frame's) or held (a joined sequence's)
        self.on_step = on_step
        self.rooms: dict[tuple[int, int], _Room] = {}  # a joined sequence's: each frame's room, by its prefix
        self._claimed = 0

    @classmethod
    def join(cls, parts: list[PackedSequence], rooms: list[int]) -> tuple[PackedSequence, list[int]]:
        """The frames' sequences end to end in one cache, each followed by ``rooms[i]`` slots for its answers'
        tokens, and the slot offset of each: every slot keeps exactly the keys and values it had alone (the
        parts are spent: drop them, their caches are copies now)."""
        if len(parts) == 1:
            return parts[0], [0]
        first = parts[0]
        cache = join([p.cache for p in parts], [p.length for p in parts], rooms, first.lm.model.config.text_config)
        joined = cls(first.lm, cache, 0, first.on_step)
        joined.prefixes = []
        offsets = []
        for part, room in zip(parts, rooms, strict=True):
            base = joined.length
            offsets.append(base)
            shifted = [(start + base, end + base) for start, end in part.prefixes]
            joined.prefixes += shifted
            for prefix in shifted:
                joined.rooms[prefix] = _Room(prefix[0], base + part.length, base + part.length + room)
            joined.length += part.length + room
        return joined, offsets

    def claim(self, prefix: tuple[int, int]) -> int:
        """The slot of the next token of the frame whose prefix is ``prefix``, in the coming pass: a lone
        frame's sequence grows at its end; in a joined one, each frame's answers fill the room after it."""
        room = self.rooms.get(prefix)
        if room is None:
            self._claimed += 1
            return self.length + self._claimed - 1
        if room.next >= room.end:
            raise RuntimeError("a frame's answers outgrew the room the joined cache holds for them")
        room.next += 1
        return room.next - 1

    def forward(self, tokens: list[_Token]) -> torch.Tensor:
        """Write ``tokens`` to the cache, each at its own slot (the last of its context); returns their final
        hidden states (len(tokens), hidden)."""
        _use_cores(self.lm)
        count = len(tokens)
        slots = [tok.context[-1] for tok in tokens]
        self._claimed = 0
        appended = slots == list(range(self.length, self.length + count))
        total = self.length + count if appended else self.length
        mask = torch.zeros((1, 1, count, total), dtype=torch.bool)
        positions = torch.empty((3, 1, count), dtype=torch.long)
        for i, tok in enumerate(tokens):
            mask[0, 0, i, tok.prefix[0]: tok.prefix[1]] = True
            mask[0, 0, i, tok.context] = True
            positions[:, 0, i] = tok.position
        where = torch.tensor(slots)
        plan = {} if appended else {spans.KWARG: self._spans(tokens, where)}
        text_model = self.lm.model.model.language_model
        hidden = textpass.run(
            text_model,
            text_model.embed_tokens(torch.tensor([[t.token for t in tokens]])),
            # Row 0 of the position ids is the cache slot; rows 1-3 the rotary positions.
            torch.cat([where.view(1, 1, -1), positions], dim=0),
            mask,
            self.cache,
            plan,
        )
        self.length = total
        self.on_step()
        return hidden[0]

    def _spans(self, tokens: list[_Token], slots: torch.Tensor) -> spans.FrameSpans:
        """A joined sequence's pass: its tokens grouped by frame, each group over its frame's span so far."""
        rows: dict[tuple[int, int], list[int]] = {}
        for i, tok in enumerate(tokens):
            rows.setdefault(tok.prefix, []).append(i)
        groups = tuple((torch.tensor(own), self.rooms[prefix].start, self.rooms[prefix].next)
                       for prefix, own in rows.items())
        return spans.FrameSpans(slots, groups)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The next-token logits of ``hidden``'s rows in float32, as ``generate()`` chooses from them."""
        logits: torch.Tensor = self.lm.model.lm_head(hidden)
        return logits.float()


def _use_cores(lm: LoadedModel) -> None:
    """Set this thread's pool to the cores the answers may use now (fewer while the int8 layers are packed)."""
    wanted = answer_threads(lm.packer, lm.threads)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


@torch.inference_mode()
def encode_prefix(lm: LoadedModel, image: EncodedImage, prefix_ids: list[int], positions: torch.Tensor,
                  on_step: Callable[[], None] = lambda: None) -> PackedSequence:
    """Run the vision encoder and prefill the prompt up to the end of the image."""
    _use_cores(lm)
    model = lm.model
    ids = torch.tensor([prefix_ids])
    text_model = model.model.language_model
    embeds = text_model.embed_tokens(ids)
    features = model.model.get_image_features(image.pixel_values, image.grid_thw, return_dict=True)
    on_step()
    image_embeds = torch.cat(list(features.pooler_output), dim=0).to(embeds.dtype)
    deepstack = [torch.cat(list(f), dim=0).to(embeds.dtype) for f in features.deepstack_features]
    mask = ids == lm.image_token_id
    if int(mask.sum()) != image_embeds.shape[0]:
        raise RuntimeError("image token count does not match the image embeddings")
    embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), image_embeds)
    length = len(prefix_ids)
    position_ids = torch.cat([torch.arange(length).view(1, 1, -1), positions.view(3, 1, -1)], dim=0)
    cache = new_cache(model.config.text_config, stored_dtype(lm.precision))
    text_model(
        inputs_embeds=embeds,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        visual_pos_masks=mask,
        deepstack_visual_embeds=deepstack,
    )
    on_step()
    return PackedSequence(lm, cache, length, on_step)


def _text_position(positions: torch.Tensor, offset: int) -> int:
    """Text after the image advances all three RoPE axes together."""
    return int(positions[0, -1]) + offset


@torch.inference_mode()
def prefill_branches(seq: PackedSequence, branches: list[Branch]) -> None:
    """Every branch's suffix and options after the prefix of a one-frame sequence: yes/no and choices are
    scored, a generating branch gets its first token."""
    (prefix,) = seq.prefixes
    for branch in branches:
        branch.prefix = prefix
    # Suffixes and options, packed into as few passes as the token budget allows.
    pending = list(branches)
    while pending:
        batch: list[Branch] = []
        budget = PREFILL_TOKENS
        while pending and (not batch or _prefill_size(pending[0]) <= budget):
            budget -= _prefill_size(pending[0])
            batch.append(pending.pop(0))
        _prefill(seq, batch)


@torch.inference_mode()
def decode_branches(seq: PackedSequence, branches: list[Branch], max_batch: int) -> DecodeStats:
    """Decode the prefilled generating branches (any frame's) to their ends, sharing the forward passes."""
    stats = DecodeStats()
    _generate(seq, [b for b in branches if b.kind == "generate" and not _done(b)], max_batch, stats)
    return stats


def room_for(branches: list[Branch]) -> int:
    """The most tokens a frame's prefilled branches will write while they decode: each generating one feeds
    back every token it takes but the last."""
    return sum(branch.max_new - len(branch.generated) for branch in branches
               if branch.kind == "generate" and not _done(branch))


def shift(branch: Branch, offset: int) -> None:
    """Move a prefilled branch by ``offset`` slots, where its frame's sequence now sits in a joined one."""
    branch.prefix = (branch.prefix[0] + offset, branch.prefix[1] + offset)
    branch.slots = [slot + offset for slot in branch.slots]


def _prefill_size(branch: Branch) -> int:
    return len(branch.tokens) + sum(len(o) for o in branch.options)


def _prefill(seq: PackedSequence, batch: list[Branch]) -> None:
    tokens: list[_Token] = []
    # Rows whose logits are needed: (branch, option index or -1 for the suffix's end, index in tokens,
    # the option token that row predicts).
    wanted: list[tuple[Branch, int, int, int]] = []
    slot = seq.length
    for branch in batch:
        branch.slots = list(range(slot, slot + len(branch.tokens)))
        for j, token in enumerate(branch.tokens):
            tokens.append(_Token(token, branch.positions[:, j], branch.slots[: j + 1], branch.prefix))
        slot += len(branch.tokens)
        wanted.append((branch, -1, len(tokens) - 1, -1))
        for k, option_ids in enumerate(branch.options):
            own = list(range(slot, slot + len(option_ids)))
            for j, token in enumerate(option_ids):
                tokens.append(_Token(token, _text_position(branch.positions, j + 1), branch.slots + own[: j + 1],
                                     branch.prefix))
                if j + 1 < len(option_ids):
                    wanted.append((branch, k, len(tokens) - 1, option_ids[j + 1]))
            slot += len(option_ids)
    hidden = seq.forward(tokens)
    logits = seq.logits(hidden[[index for _, _, index, _ in wanted]])
    logp = torch.log_softmax(logits, dim=-1)
    for branch in batch:
        branch.scores = [0.0] * len(branch.options)
    for row, (branch, option, _, target) in enumerate(wanted):
        if option >= 0:
            branch.scores[option] += float(logp[row, target])
        elif branch.kind == "next":
            branch.logprobs = logp[row]
        elif branch.kind == "choice":
            # The last suffix token predicts the first token of every option.
            for k, opt in enumerate(branch.options):
                branch.scores[k] += float(logp[row, opt[0]])
        else:
            _take(seq.lm, branch, _choose(branch, logits[row]))


def _choose(branch: Branch, logits: torch.Tensor) -> int:
    """The greedy choice from a row's logits, as ``generate()`` makes it (the log-probabilities would order
    the tokens alike, but rounding can tie two that the logits tell apart); under a grammar, among the tokens it
    allows (what a logits processor setting the others to minus infinity gives)."""
    if branch.constraint is None:
        return int(logits.argmax())
    allowed = branch.constraint.allowed()
    if not bool(allowed.any()):
        return -1  # the grammar is in an error state: nothing can follow
    return int(logits.masked_fill(~allowed, float("-inf")).argmax())


def _take(lm: LoadedModel, branch: Branch, token: int) -> None:
    """Record a generated token; an end token finishes the branch unless the benchmark forces full length, and
    so does a grammar that allows nothing more (the end token it would force costs no forward pass)."""
    constraint = branch.constraint
    if token < 0:
        branch.max_new = len(branch.generated)  # stuck: ends here, unfinished
        return
    branch.generated.append(token)
    branch.finished_by_eos = token in lm.eos_ids and not branch.ignore_eos
    if constraint is not None and not branch.finished_by_eos:
        constraint.accept(token)
        branch.finished_by_eos = constraint.complete


def _done(branch: Branch) -> bool:
    return branch.finished_by_eos or len(branch.generated) >= branch.max_new


def _generate(seq: PackedSequence, waiting: list[Branch], max_batch: int, stats: DecodeStats) -> None:
    """Greedy decoding; up to ``max_batch`` branches share each forward pass."""
    active: list[Branch] = []
    while waiting or active:
        while waiting and len(active) < max_batch:
            active.append(waiting.pop(0))
        started = time.perf_counter()
        tokens = []
        for branch in active:
            branch.slots.append(seq.claim(branch.prefix))  # the slot of its latest token
            tokens.append(_Token(branch.generated[-1], _text_position(branch.positions, len(branch.generated)),
                                 branch.slots, branch.prefix))
        hidden = seq.forward(tokens)
        logits = seq.logits(hidden)  # greedy choices need no log-softmax over the vocabulary
        choices = logits.argmax(dim=-1).tolist()
        for row, branch in enumerate(active):
            if branch.constraint is not None:  # the greedy choice among what its grammar allows
                choices[row] = _choose(branch, logits[row])
        stats.steps += 1
        stats.seconds += time.perf_counter() - started
        still = []
        for branch, token in zip(active, choices, strict=True):
            _take(seq.lm, branch, token)
            if not _done(branch):
                still.append(branch)
        active = still

