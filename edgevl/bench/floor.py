"""A workload's floor: the time its matrix products would take at the rates ``edgevl bench`` measured in the
same run: the prefill's weight products at the kernels' best rate at 256 or 1,024 rows (compute-bound), its
attention (the vision tower's over all of an image's patches, the language model's over the prompt) at the
measured attention rate, and every decode step at the time it takes to read the weights it multiplies at the
fastest memory read measured.  Norms, activations, the image's preprocessing and Python are not counted, so
the floor is below anything reachable; the fraction reached says how much of the time is these products."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevl.config import INT8_ROWS
from edgevl.engine.model_files import read_config, read_tensor_infos


@dataclass(frozen=True)
class LinearParams:
    vision: int  # the vision tower's matrices (and its merger's)
    text: int  # the language model's matrices, without the embedding
    head: int  # the output head (the embedding, when tied)
    vision_attention: int = 0  # the vision tower's attention width summed over its layers (layers x hidden)
    text_attention: int = 0  # the language model's (layers x query heads x head width)


def linear_params(path: Path) -> LinearParams:
    vision = text = head = embedding = 0
    for info in read_tensor_infos(path):
        if len(info.shape) != 2 or not info.name.endswith(".weight"):
            continue
        if ".visual." in info.name or info.name.startswith("visual."):
            vision += info.numel
        elif "embed_tokens" in info.name:
            embedding = info.numel
        elif info.name.startswith("lm_head"):
            head = info.numel
        else:
            text += info.numel
    config = read_config(path)
    v, t = config.get("vision_config", {}), config.get("text_config", config)
    heads = int(t["num_attention_heads"])
    text_width = int(t.get("head_dim") or int(t["hidden_size"]) // heads) * heads
    return LinearParams(vision, text, head or embedding, int(v.get("depth", 0)) * int(v.get("hidden_size", 0)),
                        int(t["num_hidden_layers"]) * text_width)


def projection_shape(path: Path) -> tuple[int, int]:
    """The inputs and outputs of the checkpoint's gate and up projections (hidden x intermediate): the matrix the
    Kernels table measures (2048x6144 in Qwen3-VL-2B)."""
    config = read_config(path)
    t = config.get("text_config", config)
    return int(t["hidden_size"]), int(t["intermediate_size"])


def work_of(engine: Any, image: Any, questions: Sequence[Any], max_pixels: int, decode_steps: int) -> dict[str, int]:
    """What one frame asks of the products: vision patches, prefilled tokens (of which the shared prefix),
    rows whose logits are computed in the prefill, and decode steps (counted by the engine)."""
    from edgevl.engine.prompts import build_prompt, preprocess_image

    lm = engine.lm
    encoded = preprocess_image(lm, image, max_pixels)
    prompts = [build_prompt(lm, q.prompt_text(), encoded) for q in questions]
    branches = [engine.branch(q, p) for q, p in zip(questions, prompts, strict=True)]
    prefix = len(prompts[0].prefix_ids)
    tokens = prefix + sum(len(b.tokens) + sum(len(o) for o in b.options) for b in branches)
    # The end of each suffix, and each option token but the last, predicts a token whose score is read.
    rows = sum(1 + sum(len(o) - 1 for o in b.options) for b in branches)
    return {"patches": int(encoded.grid_thw.prod()), "prefill_tokens": tokens, "prefix_tokens": prefix,
            "logit_rows": rows, "decode_steps": decode_steps}


def attention_flops(params: LinearParams, work: dict[str, int]) -> float:
    """Scores and weighted sums of the prefill: every patch with every patch of its image in each vision layer;
    the prefix causally, and each question's tokens with the prefix, in each language-model layer."""
    return vision_attention_flops(params, work) + text_attention_flops(params, work)


def vision_attention_flops(params: LinearParams, work: dict[str, int]) -> float:
    return 4.0 * params.vision_attention * work["patches"] ** 2


def text_attention_flops(params: LinearParams, work: dict[str, int]) -> float:
    prefix = work.get("prefix_tokens", 0)
    return 4.0 * params.text_attention * (prefix**2 / 2 + (work["prefill_tokens"] - prefix) * prefix)


def attention_seconds(params: LinearParams, work: dict[str, int], rates: dict[str, float], precision: str) -> float:
    """The prefill's attention at the rates of the attention the engine runs: an int8 vision tower attends in
    bfloat16 where the bench measured that rate (``kernels.bfloat16_attention_fast``), all else in float32."""
    vision_rate = rates["attention_gflops"]
    if precision in INT8_ROWS and "attention_bf16_gflops" in rates:
        vision_rate = rates["attention_bf16_gflops"]
    return (vision_attention_flops(params, work) / (vision_rate * 1e9)
            + text_attention_flops(params, work) / (rates["attention_gflops"] * 1e9))


def step_bytes(params: LinearParams, precision: str) -> int:
    """The weights a decode step reads: the language model's and the output head's (int4: the language model's in
    four-bit groups, half a byte a weight and a byte's step a group of 128; the head's int8 rows)."""
    if precision == "int4":
        return params.text // 2 + params.text // 128 + params.head
    return (params.text + params.head) * (4 if precision == "float32" else 1)


def steps_read(params: LinearParams, result: dict[str, Any]) -> float:
    """GB/s at which the engine's decode steps in ``result`` read their weights (their weights over their time)."""
    return step_bytes(params, result["precision"]) / float(result["decode_seconds_per_token"]) / 1e9


def decode_read(params: LinearParams, results: Sequence[dict[str, Any]]) -> float:
    """GB/s at which the engine's decode steps read their weights: the fastest of the precisions measured."""
    rates = [steps_read(params, r) for r in results
             if r["precision"] in ("float32", "int8", "int4") and r.get("decode_seconds_per_token")]
    return round(max(rates, default=0.0), 1)


def best_read(rates: dict[str, float]) -> float:
    """The fastest memory read measured in this run: the sum's, or the engine's own decode steps'
    (``decode_read_gbs``, where the bench set it).  These hosts are shared: on one, float32 decode steps read
    their 6.9 GB at 24 GB/s while the sum, minutes later, read at 20."""
    return max(rates["read_gbs"], rates.get("decode_read_gbs", 0.0))


def floor_seconds(params: LinearParams, work: dict[str, int], rates: dict[str, float], precision: str) -> float | None:
    """The floor of ``work`` in ``precision``; None where the bench measured no kernel of that precision."""
    # The prefill at the fastest rate (256 or 1,024 rows) of the precision's kernels measured in this run, and
    # every decode step at the fastest read: which is fastest differs between hosts, and a floor is never above
    # what the host's best kernel would do.
    # int4 prefills on its own kernel, or on oneDNN's int8 copy where the CPU has AMX (onednn_int8.packed).
    int8 = ("int8", "int8_int_mm", "int8_onednn")
    kernels = {"float32": ("packed", "float32"), "int8": int8, "int4": ("int4", *int8)}.get(precision, ())
    measured = [rates[f"{k}_m{rows}"] for k in kernels for rows in (256, 1024) if f"{k}_m{rows}" in rates]
    if not measured:
        return None
    prefill = 2 * (params.vision * work["patches"] + params.text * work["prefill_tokens"]
                   + params.head * work["logit_rows"])
    attention = attention_seconds(params, work, rates, precision)
    return prefill / (max(measured) * 1e9) + attention + work["decode_steps"] * step_bytes(params, precision) / (
        best_read(rates) * 1e9)
