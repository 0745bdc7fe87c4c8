"""``edgevl bench``: workload W4 on a random checkpoint with the real Qwen3-VL-2B shapes.

W4 is one 1280x720 frame at the default max_pixels with four questions (two
yes_no, one choice of three options, one text answer forced to 24 tokens).
Each precision runs in a child process of its own so that its peak RSS is its
own; the child also runs the naive baseline (one ``generate()`` per question on
the full prompt) on the same model in the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgevl.bench.document import float32_packs, render_doc
from edgevl.bench.floor import attention_seconds, decode_read, floor_seconds, linear_params, projection_shape
from edgevl.bench.kernels import kernel_rates
from edgevl.bench.targets import target_lines
from edgevl.bench.workload import W4X8_FRAMES
from edgevl.config import DEFAULT_MAX_PIXELS
from edgevl.errors import ModelError
from edgevl.worker import footprint


def default_checkpoint() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return base / "edgevl" / "bench" / "qwen3-vl-2b-random"


def ensure_checkpoint(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    from edgevl.bench.checkpoints import QWEN3_VL_2B, build_checkpoint

    print(f"building the random 2B-shaped checkpoint in {path} (once)", file=sys.stderr)
    tmp = path.with_name(path.name + ".partial")
    build_checkpoint(tmp, QWEN3_VL_2B, dtype="bfloat16")
    tmp.rename(path)
    return path


def run_bench(precisions: list[str], as_json: bool, checkpoint: Path | None, write_doc: Path | None,
              threads: int) -> int:
    from edgevl.engine.tuning import usable_cores

    path = ensure_checkpoint(checkpoint or default_checkpoint())
    threads = threads or usable_cores()
    results: list[dict[str, Any]] = []
    for precision in dict.fromkeys(precisions):
        print(f"bench: {precision}, engine and naive generate() …", file=sys.stderr)
        # The first start of an int8 or float32 worker prepares its weights; the ready figure is a later start's.
        shutil.rmtree(path.parent / "prepared", ignore_errors=True)
        result = _child(path, precision, threads)
        print(f"bench: {precision}, a second start …", file=sys.stderr)
        _settle(path)
        result.update(_child(path, precision, threads, "ready"))
        copy = footprint.prefill_copy_pays(precision)  # type: ignore[arg-type]  # the bench's worker has no cap
        if copy and precision == "int4":
            print(f"bench: {precision}, a later start without the prefill copy …", file=sys.stderr)
            result.update(_child(path, precision, threads, "without-copy"))
        print(f"bench: {precision}, stock model-card path …", file=sys.stderr)
        baseline = _child(path, precision, threads, "stock")
        result["stock_seconds_per_image"] = baseline["stock_seconds_per_image"]
        result["speedup_vs_stock"] = round(baseline["stock_seconds_per_image"] / result["seconds_per_image"], 2)
        result["text_identical_to_stock"] = result["text_tokens"] == baseline["text_tokens"]
        estimate = footprint.estimate(path, precision, result["max_batch"], DEFAULT_MAX_PIXELS,  # type: ignore[arg-type]
                                      prefill_copy=copy)
        result["estimated_bytes"] = estimate.total
        if copy:  # what a worker whose cap leaves no room for the prefill copy would need
            result["estimated_bytes_without_copy"] = footprint.estimate(
                path, precision, result["max_batch"], DEFAULT_MAX_PIXELS).total  # type: ignore[arg-type]
        result["w4x8_estimated_bytes"] = footprint.estimate(
            path, precision, result["max_batch"], DEFAULT_MAX_PIXELS, W4X8_FRAMES, copy).total  # type: ignore[arg-type]
        results.append(result)
    print("bench: kernel rates …", file=sys.stderr)
    kernels = kernel_rates(threads, *projection_shape(path))
    params = linear_params(path)
    kernels["decode_read_gbs"] = decode_read(params, results)
    for r in results:
        r["floor_seconds_per_image"] = _rounded(floor_seconds(params, r["w4_work"], kernels, r["precision"]))
        r["wdoc_floor_seconds_per_page"] = _rounded(floor_seconds(params, r["wdoc_work"], kernels, r["precision"]))
        r["wdoc_attention_seconds"] = attention_seconds(params, r["wdoc_work"], kernels, r["precision"])
    by_precision = {r["precision"]: r for r in results}
    if "float32" in by_precision:
        base = by_precision["float32"]
        for r in results:
            r["speedup_vs_float32"] = round(base["seconds_per_image"] / r["seconds_per_image"], 2)
            r["answers_differing_from_float32"] = _differences(base["answers"], r["answers"])
    public = ("workload", "precision", "seconds_per_image", "floor_seconds_per_image", "naive_seconds_per_image",
              "speedup", "peak_rss_bytes", "prefill_seconds", "decode_seconds_per_token", "ready_seconds",
              "standby_ready_seconds", "w4x8_frames_per_minute", "w4x8_speedup", "wdoc_seconds_per_page",
              "wdoc_floor_seconds_per_page")
    for r in results:
        if as_json:
            print(json.dumps({k: r[k] for k in public}))
        else:
            print(f"{r['precision']:>9}: {r['seconds_per_image']:.2f} s/image"
                  f" (naive {r['naive_seconds_per_image']:.2f} s, {r['speedup']:.2f}x;"
                  f" stock {r['stock_seconds_per_image']:.2f} s),"
                  f" peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB,"
                  f" prefill {r['prefill_seconds']:.2f} s, decode {r['decode_seconds_per_token'] * 1000:.0f} ms/token,"
                  f" ready {r['ready_seconds']:.1f} s (a standby {r['standby_ready_seconds']:.1f} s,"
                  f" first start {r['first_ready_seconds']:.1f} s);"
                  f" W4x8 {r['w4x8_frames_per_minute']:.1f} frames/min ({r['w4x8_speedup']:.2f}x);"
                  f" W-doc {r['wdoc_seconds_per_page']:.2f} s/page")
    print("bench: the grammar mask of a schema, per token …", file=sys.stderr)
    from edgevl.bench.grammar import mask_costs

    grammar = mask_costs(path.with_name("qwen-sized-tokenizer.json"))
    print(f"  schema mask: median {grammar['median_us']:.0f} µs, p99 {grammar['p99_us']:.0f} µs per token"
          f" ({grammar['vocab']:.0f}-token vocabulary)", file=sys.stderr)
    if write_doc is not None:
        targets = target_lines(results, kernels, params, float32_packs(results), threads)
        write_doc.write_text(render_doc(results, kernels, threads, grammar, targets))
        print(f"wrote {write_doc}", file=sys.stderr)
    return 0


def _rounded(seconds: float | None) -> float | None:
    """Three significant digits: a floor of the 2B shapes is seconds, the test model's a fraction of a millisecond."""
    return None if seconds is None else float(f"{seconds:.3g}")


def _settle(checkpoint: Path) -> None:
    """What a later start's ready target is measured from: its files in the page cache, and the first start's
    writing done. The first start's run (a 9 GB process beside 13 GB of float32 files and checkpoint) had pushed
    some of them out of a 24 GB host's cache: its later start took 11.6 s there, 6.3 s from a warm cache."""
    os.sync()
    chunk = bytearray(16 << 20)
    for file in sorted(checkpoint.glob("*.safetensors")) + sorted((checkpoint.parent / "prepared").glob("*")):
        with file.open("rb", buffering=0) as f:
            while f.readinto(chunk):
                pass


def _child(path: Path, precision: str, threads: int, *extra: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "edgevl.bench.child", str(path), precision, str(threads), *extra],
        stdout=subprocess.PIPE, check=False, text=True,
    )
    if proc.returncode != 0:
        raise ModelError(f"benchmark run for {precision} failed (exit {proc.returncode})", "bench_failed")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _differences(base: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, int]:
    total = differ = 0
    for frame_a, frame_b in zip(base, other, strict=True):
        for qid, a in frame_a.items():
            total += 1
            differ += a != frame_b[qid]
    return {"differing": differ, "of": total}
