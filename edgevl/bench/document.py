"""docs/performance.md from one ``edgevl bench`` run: its results, the kernel rates, the targets' table."""

from __future__ import annotations

import datetime as dt
from typing import Any

from edgevl.bench.floor import best_read
from edgevl.bench.host import machine
from edgevl.bench.kernels import INT4_GROUP, ROWS, int4_verdict, matrix_shape
from edgevl.engine import onednn_int8
from edgevl.engine.float32_packing import PAYS_AT


def float32_packs(results: list[dict[str, Any]]) -> bool:
    """Whether the bench's float32 engine ran on oneDNN-packed weights (its trial at load chose them)."""
    return any(r.get("float32_packs") for r in results if r["precision"] == "float32")


def _kernel_row(kernels: dict[str, float], name: str, label: str) -> str:
    return f"| {label} | " + " | ".join(str(kernels.get(f"{name}_m{rows}", "–")) for rows in ROWS) + " |"


def render_doc(results: list[dict[str, Any]], kernels: dict[str, float], threads: int,
               grammar: dict[str, float], targets: list[str]) -> str:
    packs = float32_packs(results)  # which float32 kernel the engine ran here
    inputs, outputs = matrix_shape(kernels)
    speedup = next((r.get("float32_packing_speedup") for r in results if r["precision"] == "float32"), None)
    trial = "" if speedup is None else f"; its trial at load timed it {speedup:.2f}x as fast"
    lines = [
        "# Performance",
        "",
        "Produced by `edgevl bench --write-doc docs/performance.md`; do not edit by hand.",
        "",
        f"Measured {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} on: {machine()}; {threads} threads.",
        "",
        "Workload W4: a 1280x720 JPEG frame at max_pixels 448x448 (180 image tokens), four questions:",
        "two yes_no, one choice of three options, one text answer forced to 24 tokens. The checkpoint has",
        "random weights with the exact shapes of Qwen/Qwen3-VL-2B-Instruct (same compute and memory).",
        "The naive baseline is one `generate()` per question on its full prompt (4 new tokens for the short",
        "types, 24 for the text) on the engine's own loaded model, in the same process after the engine's",
        "frames: same weights and kernels, so the speedup is the engine's alone. The stock column is the",
        "model card's way end to end in a process of its own: stock `from_pretrained` in the same",
        "precision (int8 and int4: torch's `quantize_dynamic` int8 recipe) and the same `generate()` calls.",
        "Peak RSS is",
        "the engine process's high-water mark, loading included, before the naive runs. Seconds per image",
        "are the median of four frames after a warm-up frame. Ready is the time from a worker process's start",
        "(interpreter and imports included) until its first answer is possible, with the checkpoint in the",
        "page cache: at the first start (which prepares the weights: int8's and int4's as it loads, float32's",
        "behind its answers, the workloads timed once that is done) and at a later one (from the prepared",
        "weights).",
        "",
        "| precision | s / image | naive s / image | speedup vs naive | stock s / image | speedup vs stock |"
        " speedup vs float32 | peak RSS | prefill (vision + prefix) s | decode s / token | ready s, first start |"
        " ready s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stream = [
        "",
        "## W4x8: a burst (the stream mode)",
        "",
        "Eight W4 frames queued at once and answered together, in the same process after W4's frames: each",
        "frame's prefix is prefilled alone, then every frame's questions share the forward passes. Frames per",
        "minute against W4's single-frame rate (60 / its seconds per image); the answers are compared with the",
        "same frames answered alone (W4's five; float32 must be identical). The bound is the speedup were",
        "every decode step shared for free (W4's seconds per image over the same less its decode steps): a",
        "frame's prefill (vision tower, prefix, questions) is compute-bound and costs the same in company.",
        "Peak RSS is the process's high-water mark after the burst, beside the daemon's estimate for eight",
        "frames.",
        "",
        "| precision | frames / min, one at a time | frames / min, 8 queued | speedup | bound | answers identical to"
        " alone | decode s / step (all frames' rows) | peak RSS | estimate, 8 frames |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    documents = [
        "",
        "## W-doc: a document page",
        "",
        "One A4 page scan (1240x1754, 150 dpi) at max_pixels 1024x1024 with one text answer forced to 128",
        "tokens, answered once in the same process after W4's frames.",
        "",
        "| precision | s / page | prefill (vision + prefix) s | image tokens | decode s / token | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    floors = [
        "",
        "## Floors",
        "",
        "The time the workload's products alone would take at the rates of this run (edgevl.bench.floor,",
        "Kernels table): the vision tower's patches, the prefilled tokens and the prefill's logit rows at the",
        "fastest 256- or 1,024-row rate of the precision's kernels (float32: oneDNN packed or `F.linear`; int8:",
        "fbgemm, `_int_mm` or oneDNN; int4: those and its own; which is fastest differs between hosts); the",
        "prefill's attention (every",
        "patch with every patch of its image in each vision layer, the prompt in each language-model layer) at",
        "the attention rate (an int8 vision tower's at the bfloat16 rate where it attends so); each decode step",
        "as the time to read the weights it multiplies (the language model and the output head: 6.9 GB in",
        "float32, 1.7 GB in int8, 1.0 GB in int4) at the fastest memory read measured. Norms, activations,",
        "preprocessing and",
        "Python are not counted; the fraction is how much of the measured time the floor is. The attention",
        "column is the vision tower's and the prompt's share of the floor.",
        "",
        "| precision | W4 s / image | W4 floor s | fraction of W4 at its floor | W-doc s / page | W-doc floor s |"
        " of which attention s | fraction of W-doc at its floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    restart = [
        "",
        "## Ready after a start",
        "",
        "A later start of the worker process (int8 and float32: from their prepared weights), with the checkpoint",
        "and the prepared file in the page cache: ready (its first answer possible), W4's first frame answered, and",
        "full speed. On a CPU with VNNI, int8 answers at once with `torch._int_mm` on the int8 rows mapped from",
        "the prepared file while one thread packs the layers for fbgemm (edgevl.engine.packing; the answers use",
        "one thread fewer meanwhile), and full speed is when the last is packed; elsewhere it packs each layer",
        "as it maps it, and is at full speed when ready. float32 answers at once with `F.linear` on its mapped",
        "float32 weights, and where its trial chose oneDNN's packed kernel one thread packs them behind the answers",
        "in the same way. Peak RSS is that process's high-water mark through its first answer and the packing.",
        "The daemon replaces a lost worker with its standby (`model.standby`), a process that made the same",
        "imports before it was needed: it is ready in the start's seconds less its interpreter and imports.",
        "",
        "| precision | ready s | ready s, a standby taking over | first W4 frame answered at s | full speed at s |"
        " packed behind answers | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    memory = [
        "",
        "## Memory",
        "",
        "What the daemon estimates before it starts a worker (from the config and tensor shapes; a worker",
        "that would not fit under `model.memory_limit` is refused), the measured resident peak, and the",
        "peak virtual size of the same process. The virtual size is why the worker's cap is the kernel's",
        "memory accounting (a cgroup) or a resident-size watchdog, never an address-space rlimit.",
        "",
        "| precision | estimate before loading | peak RSS | peak virtual size |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['precision']} | {r['seconds_per_image']:.2f} | {r['naive_seconds_per_image']:.2f} | "
            f"{r['speedup']:.2f}x | {r['stock_seconds_per_image']:.2f} | {r['speedup_vs_stock']:.2f}x | "
            f"{r.get('speedup_vs_float32', float('nan')):.2f}x | "
            f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {r['prefill_seconds']:.2f} | "
            f"{r['decode_seconds_per_token']:.3f} | {r['first_ready_seconds']:.1f} | {r['ready_seconds']:.1f} |"
        )
        stream.append(f"| {r['precision']} | {60 / r['seconds_per_image']:.2f} | {r['w4x8_frames_per_minute']:.2f} | "
                      f"{r['w4x8_speedup']:.2f}x | {r['w4x8_speedup_bound']:.2f}x | "
                      f"{r['w4x8_identical_frames']} of {r['w4x8_compared_frames']} frames | "
                      f"{r['w4x8_decode_seconds_per_step']:.3f} | {r['w4x8_peak_rss_bytes'] / 1e9:.2f} GB | "
                      f"{r['w4x8_estimated_bytes'] / 1e9:.2f} GB |")
        documents.append(f"| {r['precision']} | {r['wdoc_seconds_per_page']:.2f} | {r['wdoc_prefill_seconds']:.2f} | "
                         f"{r['wdoc_image_tokens']} | {r['wdoc_decode_seconds_per_token']:.3f} | "
                         f"{r['wdoc_peak_rss_bytes'] / 1e9:.2f} GB |")
        if r.get("floor_seconds_per_image") is not None:
            floors.append(f"| {r['precision']} | {r['seconds_per_image']:.2f} | {r['floor_seconds_per_image']:.2f} | "
                          f"{r['floor_seconds_per_image'] / r['seconds_per_image']:.0%} | "
                          f"{r['wdoc_seconds_per_page']:.2f} | {r['wdoc_floor_seconds_per_page']:.2f} | "
                          f"{r['wdoc_attention_seconds']:.2f} | "
                          f"{r['wdoc_floor_seconds_per_page'] / r['wdoc_seconds_per_page']:.0%} |")
        restart.append(f"| {r['precision']} | {r['ready_seconds']:.1f} | {r['standby_ready_seconds']:.1f} | "
                       f"{r['first_answer_seconds']:.1f} | "
                       f"{r['full_speed_seconds']:.1f} | {'yes' if r.get('packed_behind') else 'no'} | "
                       f"{r['ready_peak_rss_bytes'] / 1e9:.2f} GB |")
        memory.append(f"| {r['precision']} | {r['estimated_bytes'] / 1e9:.2f} GB | "
                      f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {r['peak_virtual_bytes'] / 1e9:.2f} GB |")
    lines += ["", "Text answer token-identical to `generate()` on the same frame (naive: same model; stock:",
              "the stock model and kernels):", ""]
    for r in results:
        lines.append(f"- {r['precision']}: naive {'yes' if r['text_identical_to_naive'] else 'NO'},"
                     f" stock {'yes' if r['text_identical_to_stock'] else 'NO'}")
    for r in results:
        if "without_copy_seconds_per_image" in r:
            lines += ["", f"{r['precision']} on a later start without oneDNN's int8 copy of the decoder layers for the"
                      " prefill (as under a cap with no room for it, and on every CPU without AMX):"
                      f" {r['without_copy_seconds_per_image']:.2f} s / image, decode"
                      f" {r['without_copy_decode_seconds_per_token']:.3f} s / token, peak RSS"
                      f" {r['without_copy_peak_rss_bytes'] / 1e9:.2f} GB."]
    diffs = [r for r in results if "answers_differing_from_float32" in r and r["precision"] != "float32"]
    if diffs:
        lines += ["", "Answers that differ from float32 (same frames and questions; random weights, so this",
                  "measures numerical drift, not quality):", ""]
        for r in diffs:
            d = r["answers_differing_from_float32"]
            lines.append(f"- {r['precision']}: {d['differing']} of {d['of']} answers differ")
    lines += [
        "",
        "Absolute times depend on how busy the host is (these machines are shared virtual machines; the",
        "kernel rates below were measured in the same run and show its speed). Every ratio above compares",
        "runs made one after the other in the same command.",
        *stream,
        *documents,
        *floors,
        *restart,
        *memory,
        "",
        "## Targets",
        "",
        "The project's targets for a 2-core host against this run. Where one is missed for want of a faster",
        "kernel, the floor says so: the Floors table's, with each decode step at the one-row read of the kernel",
        "the engine decodes on (edgevl.bench.targets).",
        "",
        *targets,
        "",
        "## Kernels",
        "",
        f"GFLOP/s of one {inputs}x{outputs} projection (the checkpoint's gate and up shape; Qwen3-VL-2B's is"
        " 2048x6144), measured by the same command:",
        "",
        "| kernel | 1 row (decode) | 8 rows (a burst's decode step) | 256 rows (a frame's prompt) | 1,024 rows (a"
        " frame's patches) |",
        "|---|---|---|---|---|",
        _kernel_row(kernels, "float32", f"float32 `F.linear` (stock{'' if packs else '; the engine on this host'})"),
        _kernel_row(kernels, "packed", "float32 oneDNN packed weights (the engine "
                    f"{'on this host' if packs else f'where its trial at load finds it {PAYS_AT}x as fast'}{trial})"),
        _kernel_row(kernels, "int8", "int8 fbgemm dynamic (per-channel weights)"),
        _kernel_row(kernels, "int8_int_mm", "int8 `torch._int_mm`, activations per row (the fallback where torch "
                    "has no fbgemm Linear)"),
        _kernel_row(kernels, "int8_onednn", "int8 oneDNN, activations per call (the vision tower and the "
                    f"language model's prefill {'on this host' if onednn_int8.pays() else 'where the CPU has AMX'})"),
        _kernel_row(kernels, "int4", f"int4 edgevl (`int4.c`), groups of {INT4_GROUP}, int8 activations per row (the"
                    " decode steps of precision int4)"),
        _kernel_row(kernels, "int4_torch", f"int4 `torch._weight_int4pack_mm_for_cpu`, groups of {INT4_GROUP},"
                    " bfloat16 activations (measured, not used)"),
        "",
        *int4_verdict(kernels),
        "",
        f"Memory read by the same threads (a sum over 1 GiB): {kernels['read_gbs']} GB/s; by the engine's decode steps"
        f" (their weights over their time, the faster precision): {kernels['decode_read_gbs']} GB/s; the fastest"
        f" read measured, which the floors' decode steps take:"
        f" {best_read(kernels)} GB/s. Attention (float32",
        f"SDPA, 2,048 tokens, 16 heads of 64, as in a vision layer): {kernels['attention_gflops']} GFLOP/s"
        + (f"; in bfloat16, as an int8 vision tower attends on this host: {kernels['attention_bf16_gflops']} GFLOP/s."
           if "attention_bf16_gflops" in kernels else "; an int8 vision tower attends in float32 on this host."),
        "",
        f"A start's work on its weights, one thread: fresh memory made resident at {kernels['fault_in_gbs']} GB/s"
        + (f"; int8 rows packed for fbgemm at {kernels['fbgemm_pack_mbs']} MB/s" if "fbgemm_pack_mbs" in kernels
           else "") + " (the ready floors of the Targets table).",
        "",
        "## Answers held to a schema",
        "",
        "What a `json` question's `schema` (and a `number` question's grammar) adds to each generated token,",
        "beside the forward pass: the engine's own constraint step (llguidance's mask, turned into the",
        "boolean mask applied to the log-probabilities), timed along random walks through an invoice schema",
        "(strings, a number, up to five line items), with a byte-level BPE of Qwen's vocabulary size and",
        "pre-tokenizer trained on the Python standard library (the benchmark has no Qwen tokenizer).",
        "",
        "| vocabulary | schema compiled in | tokens timed | median per token | p99 per token | slowest token |",
        "|---|---|---|---|---|---|",
        f"| {grammar['vocab']:,.0f} | {grammar['compile_ms']:.1f} ms | {grammar['tokens']:,.0f} | "
        f"{grammar['median_us']:.0f} µs | {grammar['p99_us']:.0f} µs | {grammar['max_us']:.0f} µs |",
        "",
    ]
    return "\n".join(lines)
