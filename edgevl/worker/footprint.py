"""The model's memory, estimated before it is loaded, from its config and tensor shapes.

The daemon refuses to start a worker that cannot fit under ``memory_limit``,
instead of loading for a minute and being killed. ``edgevl bench`` prints this
estimate next to the measured peak of the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevl.config import INT8_ROWS, Precision
from edgevl.cpuinfo import CPUINFO, has_flag
from edgevl.engine import int4_shape
from edgevl.engine.model_files import TensorInfo, read_config, read_tensor_infos
from edgevl.worker.memcap import format_bytes

# Python, torch with its libraries and thread pools, the tokenizer: about
# 370 MB resident once the test model is loaded.
RUNTIME_BYTES = 400 << 20
# A question's prompt plus a generous answer, per decoded row.
TOKENS_PER_ROW = 160
# Rows a frame brings to the stream mode's shared cache (its questions' prompts and answers), on average.
ROWS_PER_FRAME = 2
HEADROOM = 1.05
# The slots a frame's cache holds beyond what it has written, at least: edgevl.engine.kvcache.MIN_ROOM.
CACHE_ROOM = 256


@dataclass(frozen=True)
class Footprint:
    weights: int
    kv_cache: int
    activations: int
    runtime: int
    # What loading holds beside the weights for a while (int8: the token embedding read as bfloat16 before it
    # is quantized), freed before the first answer: the peak is the larger of this and the answers' cache and
    # activations, never their sum (int8, 2B shapes: 2.86 GB loaded, 3.28 GB at the loading peak, 3.01 GB
    # after a frame).
    loading: int = 0

    @property
    def serving(self) -> int:
        """The answers' memory: their cache and activations."""
        return self.kv_cache + self.activations

    @property
    def total(self) -> int:
        return int((self.weights + self.runtime + max(self.loading, self.serving)) * HEADROOM)


def cache_bytes(precision: Precision) -> int:
    """Bytes of one key or value element in an answer's cache: what ``edgevl.engine.kvcache.stored_dtype``
    stores (int8: bfloat16), which this module cannot ask, the daemon importing no torch."""
    return 4 if precision == "float32" else 2


def prefill_copy_pays(precision: Precision, cpuinfo: Path = CPUINFO) -> bool:
    """Whether an int8 worker here would keep its language model's prefill copy: a CPU with AMX's int8 tiles
    (``edgevl.engine.onednn_int8.pays``, which asks torch; the daemon reads the same flag from the kernel)."""
    return precision in INT8_ROWS and has_flag("amx_int8", cpuinfo)


def _prefill_copy_bytes(info: TensorInfo) -> int:
    """A decoder layer's matrix packed again for oneDNN (``edgevl.engine.onednn_int8.ByRows``, every int8 layer of
    the language model; its embedding is no product): its int8 rows, a float32 scale and an int64 zero point an
    output channel."""
    if len(info.shape) == 2 and info.name.startswith("model.language_model.layers."):
        return info.numel + info.shape[0] * 12
    return 0


def int4_fits(info: TensorInfo) -> bool:
    """Whether a decoder layer's matrix is int4's: the kernel's own shape rule (``edgevl.engine.int4_shape``)."""
    return (len(info.shape) == 2 and info.name.startswith("model.language_model.layers.")
            and int4_shape.fits(*info.shape))


def _int4_bytes(info: TensorInfo) -> int:
    """A decoder layer's matrix in four-bit groups (precision int4, ``edgevl.engine.int4_kernel``): half a byte a
    weight, a byte's step a group of 128, a float32 scale an output."""
    return info.numel // 2 + info.numel // 128 + info.shape[0] * 4


def _weight_bytes(info: TensorInfo, precision: Precision, tied: bool = False) -> int:
    if precision == "float32":
        return info.numel * 4
    if precision == "bfloat16":
        return info.numel * 2
    # int8: matrices are stored as int8 rows with one float scale per row;
    # norms, biases and convolution kernels stay float32.
    if len(info.shape) == 2 and info.name.endswith(".weight"):
        rows = info.numel + info.shape[0] * 4
        # A tied output head multiplies the embedding's int8 rows from fbgemm's own packed copy of them.
        return 2 * rows if tied and info.name.endswith("embed_tokens.weight") else rows
    return info.numel * 4


def estimate(path: Path, precision: Precision, max_batch: int, max_pixels: int, frames: int = 1,
             prefill_copy: bool = False) -> Footprint:
    """The worker's resident peak answering ``frames`` images together (the stream mode) at ``max_pixels``;
    ``prefill_copy``: with the int8 language model's second copy for its prefill."""
    config: dict[str, Any] = read_config(path)
    text: dict[str, Any] = config.get("text_config", config)
    vision: dict[str, Any] = config.get("vision_config", {})
    infos = read_tensor_infos(path)
    tied = not any(info.name.endswith("lm_head.weight") for info in infos)
    weights = sum(_weight_bytes(info, precision, tied) for info in infos)
    if precision == "int4":
        # Its decoder layers in four-bit groups instead of int8 rows (beside oneDNN's int8 copy, if kept, below).
        weights += sum(_int4_bytes(info) - _weight_bytes(info, precision) for info in infos if int4_fits(info))
    if prefill_copy and precision in INT8_ROWS:
        weights += sum(_prefill_copy_bytes(info) for info in infos)

    hidden = int(text["hidden_size"])
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or hidden // heads)
    layers = int(text["num_hidden_layers"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    patch = int(vision.get("patch_size", 16))
    merge = int(vision.get("spatial_merge_size", 2))
    act_bytes = 2 if precision == "bfloat16" else 4

    image_tokens = max_pixels // (patch * merge) ** 2
    own = image_tokens + 32  # a frame's prefix: its image and the prompt around it
    prefix_tokens = frames * own
    tokens = prefix_tokens + max(max_batch, frames * ROWS_PER_FRAME) * TOKENS_PER_ROW
    per_token = layers * 2 * kv_heads * head_dim * cache_bytes(precision)
    # Several frames' prefixes are laid end to end in one cache (edgevl.engine.kvcache.join): their own caches,
    # each with room to grow as a lone frame's (a quarter more, at least CACHE_ROOM slots), are all held until
    # the joined one is made, and released layer by layer as it is: the larger of the two counts.
    parts = frames * (own + max(own // 4, CACHE_ROOM)) if frames > 1 else 0
    kv_cache = per_token * max(tokens, parts)

    patches = max_pixels // patch**2
    vision_act = patches * int(vision.get("intermediate_size", 4 * hidden)) * act_bytes * 3
    # Prefill of the image tokens: the MLP's intermediate activations (int8: the gate and up projections are
    # one output, held until both halves are used; edgevl.engine.fusion), and the attention mask with its
    # float form.  Each frame's prefill leaves that much again in the heap, between the caches the frames keep
    # until they are joined (2B shapes, eight W4 frames: 12 MB a frame beside its cache in float32, 21 MB in int8).
    intermediates = 4 if precision in INT8_ROWS else 3
    text_act = frames * image_tokens * int(text["intermediate_size"]) * act_bytes * intermediates + 5 * tokens * tokens
    logits = max_batch * int(text["vocab_size"]) * 4
    activations = vision_act + text_act + logits
    # int8: the token embedding is read as bfloat16 before it is quantized.
    loading = int(text["vocab_size"]) * hidden * 2 if precision in INT8_ROWS else 0
    return Footprint(weights, kv_cache, activations, RUNTIME_BYTES, loading)


def frames_of(pixels: int | None, model_pixels: int) -> int:
    """How many frames at the model's ``max_pixels`` one picture of ``pixels`` (a rule's; None: the model's)
    weighs in the stream mode: its image tokens, and so its cache, grow with its pixels."""
    return max(1, math.ceil((pixels or model_pixels) / model_pixels))


def refusal(model_id: str, precision: Precision, needed: Footprint, limit: int,
            int8: Footprint | None = None) -> str:
    """The one message that says why the model does not fit, and what to change."""
    advice = "raise it"
    if precision not in INT8_ROWS and int8 is not None and int8.total <= limit:
        advice += ' or use precision = "int8"'
    else:
        advice += " or lower model.max_pixels, model.max_batch and model.max_frames"
    beside = (f"while loading {format_bytes(needed.loading)} more" if needed.loading > needed.serving
              else f"cache and activations {format_bytes(needed.serving)}")
    return (f"{model_id} in {precision} needs ≈ {format_bytes(needed.total)} "
            f"(weights {format_bytes(needed.weights)}, {beside}, runtime {format_bytes(needed.runtime)}); "
            f"model.memory_limit is {format_bytes(limit)}: {advice}")


def fit_frames(path: Path, precision: Precision, max_batch: int, max_pixels: int, limit: int,
               most: int, prefill_copy: bool = False) -> tuple[int, Footprint]:
    """The most frames, up to ``most``, whose stream fits under ``limit`` (at least 1: one frame is checked
    on its own), and their footprint."""
    frames = max(1, most)
    needed = estimate(path, precision, max_batch, max_pixels, frames, prefill_copy)
    while frames > 1 and needed.total > limit:
        frames -= 1
        needed = estimate(path, precision, max_batch, max_pixels, frames, prefill_copy)
    return frames, needed


def standby_fits(needed: Footprint, limit: int) -> bool:
    """Whether a standby (``edgevl.worker.supervisor``: a second process, in the same cap, that has imported what
    the worker imports and holds nothing else) fits under ``limit`` beside a worker that needs ``needed``."""
    return needed.total + int(RUNTIME_BYTES * HEADROOM) <= limit


def plan(path: Path, precision: Precision, max_batch: int, max_pixels: int, limit: int, frames: int,
         most: int, prefill_copy: bool) -> tuple[int, Footprint, bool]:
    """The frames one batch holds (``frames`` where set, else the most up to ``most`` that fit), their footprint,
    and whether the worker keeps its prefill copy (asked for with ``prefill_copy``): only where the copy fits
    under ``limit`` and costs the stream mode no frame, for speed never takes the place of the cap."""

    def sized(copy: bool) -> tuple[int, Footprint]:
        if frames:
            return frames, estimate(path, precision, max_batch, max_pixels, frames, copy)
        return fit_frames(path, precision, max_batch, max_pixels, limit, most, copy)

    alone = sized(False)
    if prefill_copy:
        with_copy = sized(True)
        if with_copy[0] == alone[0] and with_copy[1].total <= limit:
            return (*with_copy, True)
    return (*alone, False)
