"""One precision of ``edgevl bench``, in a process of its own so that its peak RSS is its own
(``python -m edgevl.bench.child``; started by ``edgevl.bench.command``)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from edgevl.bench.workload import (
    FRAMES,
    W4_QUESTIONS,
    W4_SHORT_TOKENS,
    W4_TEXT_TOKENS,
    W4X8_FRAMES,
    WDOC_MAX_PIXELS,
    WDOC_QUESTION,
    frame_bytes,
    page_bytes,
)
from edgevl.worker.memcap import own_peak_bytes


def naive_generate(model: Any, tokenizer: Any, processor: Any) -> tuple[float, list[int]]:
    """One ``generate()`` per question on its full prompt, as the model card does."""
    import torch

    from edgevl.config import DEFAULT_MAX_PIXELS
    from edgevl.images import decode_image

    image_token = model.config.image_token_id
    image = decode_image(frame_bytes(1)).image
    text_tokens: list[int] = []
    started = time.perf_counter()
    for q in W4_QUESTIONS:
        pixels = processor(images=[image], size={"shortest_edge": min(65536, DEFAULT_MAX_PIXELS),
                                                 "longest_edge": DEFAULT_MAX_PIXELS}, return_tensors="pt")
        n_image = int(pixels["image_grid_thw"].prod()) // 4
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.prompt_text()}]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = text.replace("<|image_pad|>", "<|image_pad|>" * n_image)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        n = W4_TEXT_TOKENS if q.type == "text" else W4_SHORT_TOKENS
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels["pixel_values"],
                image_grid_thw=pixels["image_grid_thw"], mm_token_type_ids=(ids == image_token).int(),
                max_new_tokens=n, min_new_tokens=n, do_sample=False,
            )
        if q.type == "text":
            text_tokens = out[0, ids.shape[1]:].tolist()
    return time.perf_counter() - started, text_tokens


def stock(checkpoint: str, precision: str, threads: int) -> tuple[float, list[int]]:
    """The model card's way end to end: stock ``from_pretrained`` (int8: torch's ``quantize_dynamic`` recipe; int4 as
    well, for stock transformers has no int4 on the CPU)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    model = Qwen3VLForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
    model.eval()
    if precision in ("int8", "int4"):
        quantize = torch.ao.quantization.quantize_dynamic
        model = quantize(model, {torch.nn.Linear}, dtype=torch.qint8)  # type: ignore[no-untyped-call]
    model.generation_config = GenerationConfig.from_pretrained(checkpoint)
    return naive_generate(model, AutoTokenizer.from_pretrained(checkpoint),
                          Qwen2VLImageProcessorPil.from_pretrained(checkpoint))


def process_age() -> float:
    """Seconds since this process started (the kernel's start time, so interpreter start and imports count)."""
    import os
    from pathlib import Path

    ticks = os.sysconf("SC_CLK_TCK")
    # Field 22 of stat, counted after the command's closing parenthesis (a command may hold spaces).
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start


def start_costs(imported: float) -> dict[str, float]:
    """Where a start's seconds went, at ready: the interpreter and imports (``imported``, the process's age
    when they were done), and the CPU time the kernel spent for the process (all its threads), most of it
    faulting in fresh memory page by page, with the bytes it faulted in."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"ready_import_seconds": round(imported, 1), "ready_system_cpu_seconds": round(usage.ru_stime, 1),
            "ready_faulted_bytes": usage.ru_minflt * resource.getpagesize()}


def wdoc(engine: Any) -> dict[str, float]:
    """Workload W-doc: one page, in the warm process."""
    from edgevl.bench.floor import work_of
    from edgevl.images import decode_image

    started = time.perf_counter()
    page = decode_image(page_bytes(1)).image
    answered = engine.answer(page, [WDOC_QUESTION], WDOC_MAX_PIXELS, force_full_length=True)
    return {
        "wdoc_work": work_of(engine, page, [WDOC_QUESTION], WDOC_MAX_PIXELS, answered.decode_steps),
        "wdoc_seconds_per_page": round(time.perf_counter() - started, 3),
        "wdoc_prefill_seconds": round(answered.encode_ms / 1000, 3),
        "wdoc_image_tokens": answered.image_tokens,
        "wdoc_decode_seconds_per_token": round(answered.decode_seconds / max(answered.decode_steps, 1), 4),
    }


def without_copy(checkpoint: str, precision: str, threads: int) -> dict[str, Any]:
    """W4 on a later start that keeps no int8 copy of the decoder layers for oneDNN's prefill (a CPU with AMX
    under a cap with no room for it; every CPU without AMX): int4's layers multiply every row themselves."""
    from pathlib import Path

    from edgevl.config import DEFAULT_MAX_PIXELS
    from edgevl.engine.engine import Engine
    from edgevl.engine.loading import load_model
    from edgevl.images import decode_image

    lm = load_model(checkpoint, precision, threads, Path(checkpoint).parent / "prepared",  # type: ignore[arg-type]
                    prefill_copy=False)
    if lm.packer is not None:
        lm.packer.wait()
    engine = Engine(lm)
    seconds, steps, decoding = [], 0, 0.0
    for frame in range(FRAMES):
        started = time.perf_counter()
        answered = engine.answer(decode_image(frame_bytes(frame)).image, W4_QUESTIONS, DEFAULT_MAX_PIXELS,
                                 force_full_length=True)
        if frame:  # the first warms up, as W4's
            seconds.append(time.perf_counter() - started)
            steps += answered.decode_steps
            decoding += answered.decode_seconds
    return {"without_copy_seconds_per_image": round(statistics.median(seconds), 3),
            "without_copy_decode_seconds_per_token": round(decoding / max(steps, 1), 4),
            "without_copy_peak_rss_bytes": own_peak_bytes("VmHWM")}


def _summary(answered: Any) -> dict[str, Any]:
    return {qid: {k: a.get(k) for k in ("value", "text")} | {"tokens": answered.tokens.get(qid)}
            for qid, a in answered.answers.items()}


def w4x8(engine: Any, alone: list[dict[str, Any]], single_seconds: float) -> dict[str, Any]:
    """Workload W4x8: eight frames queued, answered together (the stream mode) in the warm process; their
    answers compared with the same frames answered alone (W4's frames are its first ones)."""
    from edgevl.config import DEFAULT_MAX_PIXELS
    from edgevl.engine.engine import Answered, Frame
    from edgevl.images import decode_image

    started = time.perf_counter()
    frames = [Frame(decode_image(frame_bytes(seed)).image, W4_QUESTIONS, DEFAULT_MAX_PIXELS)
              for seed in range(W4X8_FRAMES)]
    results = engine.answer_frames(frames, force_full_length=True)
    elapsed = time.perf_counter() - started
    answered = [r for r in results if isinstance(r, Answered)]
    if len(answered) != W4X8_FRAMES:
        raise RuntimeError(f"W4x8: {W4X8_FRAMES - len(answered)} frames failed")
    per_minute = W4X8_FRAMES * 60 / elapsed
    compared = [(_summary(a), b) for a, b in zip(answered, alone, strict=False)]
    return {
        "w4x8_seconds": round(elapsed, 3),
        "w4x8_frames_per_minute": round(per_minute, 2),
        "w4x8_speedup": round(per_minute / (60 / single_seconds), 2),
        "w4x8_identical_frames": sum(a == b for a, b in compared),
        "w4x8_compared_frames": len(compared),
        "w4x8_decode_seconds_per_step": round(answered[0].decode_seconds / max(answered[0].decode_steps, 1), 4),
    }


def main() -> int:
    checkpoint, precision, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if len(sys.argv) > 4 and sys.argv[4] == "without-copy":
        print(json.dumps(without_copy(checkpoint, precision, threads)))
        return 0
    if len(sys.argv) > 4 and sys.argv[4] == "stock":
        stock_seconds, stock_text = stock(checkpoint, precision, threads)
        print(json.dumps({"stock_seconds_per_image": round(stock_seconds, 3), "text_tokens": stock_text}))
        return 0
    from pathlib import Path

    from edgevl.config import DEFAULT_MAX_PIXELS
    from edgevl.engine.engine import Engine
    from edgevl.engine.loading import load_model
    from edgevl.images import decode_image

    # int8 and float32 keep their prepared weights beside the checkpoint, as the daemon keeps them in its state_dir.
    prepared_dir = Path(checkpoint).parent / "prepared"
    imported = process_age()
    lm = load_model(checkpoint, precision, threads, prepared_dir)  # type: ignore[arg-type]
    engine = Engine(lm)
    ready = process_age()
    if len(sys.argv) > 4 and sys.argv[4] == "ready":
        start = start_costs(imported)
        # A later start: ready, its first W4 frame answered (int8: while its layers are still being packed),
        # and full speed (every layer packed).
        engine.answer(decode_image(frame_bytes(1)).image, W4_QUESTIONS, DEFAULT_MAX_PIXELS, force_full_length=True)
        first_answer = process_age()
        if lm.packer is not None:
            lm.packer.wait()
        # A standby (edgevl.worker.supervisor) made these imports before it was needed: taking over a lost
        # worker, it is ready once the load alone is done.
        print(json.dumps({"ready_seconds": round(ready, 1), "standby_ready_seconds": round(ready - imported, 1),
                          "prepared": lm.prepared,
                          "first_answer_seconds": round(first_answer, 1),
                          "full_speed_seconds": round(process_age() if lm.packer is not None else ready, 1),
                          "packed_behind": lm.packer is not None,
                          "packing_failed": lm.packer.failed if lm.packer is not None else None,
                          **start,
                          "ready_peak_rss_bytes": own_peak_bytes("VmHWM")}))
        return 0
    if lm.packer is not None:  # the workloads are timed at full speed
        lm.packer.wait()
    if lm.preparer is not None:  # and undisturbed by a first float32 start's writing of its prepared weights
        lm.preparer.wait()
    seconds, prefill, steps, decode_seconds = [], [], 0, 0.0
    answers: list[dict[str, Any]] = []
    ours_text: list[int] = []
    for frame in range(FRAMES):
        started = time.perf_counter()
        image = decode_image(frame_bytes(frame)).image
        answered = engine.answer(image, W4_QUESTIONS, DEFAULT_MAX_PIXELS, force_full_length=True)
        elapsed = time.perf_counter() - started
        answers.append(_summary(answered))
        if frame == 0:
            continue
        seconds.append(elapsed)
        prefill.append(answered.encode_ms / 1000)
        steps += answered.decode_steps
        decode_seconds += answered.decode_seconds
        if frame == 1:
            ours_text = answered.tokens["label"]
            from edgevl.bench.floor import work_of

            w4_work = work_of(engine, image, W4_QUESTIONS, DEFAULT_MAX_PIXELS, answered.decode_steps)
        print(f"  frame {frame}: {elapsed:.2f} s", file=sys.stderr)
    peak = own_peak_bytes("VmHWM")
    virtual_peak = own_peak_bytes("VmPeak")
    per_image = statistics.median(seconds)
    print(f"  W4x8: {W4X8_FRAMES} frames queued …", file=sys.stderr)
    stream = w4x8(engine, answers, per_image)
    # Were every decode step shared for free, a frame would still cost its prefill alone.
    stream["w4x8_speedup_bound"] = round(per_image / max(per_image - decode_seconds / len(seconds), 1e-9), 2)
    print(f"  W4x8: {stream['w4x8_frames_per_minute']:.1f} frames/min ({stream['w4x8_speedup']:.2f}x)",
          file=sys.stderr)
    stream["w4x8_peak_rss_bytes"] = own_peak_bytes("VmHWM")
    print("  W-doc page …", file=sys.stderr)
    document = wdoc(engine)
    print(f"  W-doc: {document['wdoc_seconds_per_page']:.2f} s", file=sys.stderr)
    wdoc_peak = own_peak_bytes("VmHWM")
    # The baseline on this very model (same weights, same kernels): the speedup
    # is then the engine's alone.
    naive_seconds, naive_text = naive_generate(lm.model, lm.tokenizer, lm.image_processor)
    print(f"  naive generate(): {naive_seconds:.2f} s", file=sys.stderr)
    from edgevl.engine.float32_packing import trial_for

    packing = trial_for(lm.config) if precision == "float32" else None  # this process's trial, not another
    print(json.dumps({
        "workload": "W4",
        "precision": precision,
        "float32_packs": packing is not None and packing.pays,
        "float32_packing_speedup": None if packing is None else round(packing.speedup, 2),
        "seconds_per_image": round(per_image, 3),
        "naive_seconds_per_image": round(naive_seconds, 3),
        "speedup": round(naive_seconds / per_image, 2),
        "peak_rss_bytes": peak,
        "peak_virtual_bytes": virtual_peak,
        "max_batch": engine.max_batch,
        "prefill_seconds": round(statistics.median(prefill), 3),
        "decode_seconds_per_token": round(decode_seconds / max(steps, 1), 4),
        "load_seconds": round(lm.load_seconds, 1),
        "first_ready_seconds": round(ready, 1),
        # A first float32 start's file is written behind its answers: what became of it, now that it is done.
        "prepared": lm.prepared if lm.preparer is None else lm.preparer.outcome,
        "preparing_seconds": round(lm.preparer.seconds, 1) if lm.preparer is not None else None,
        "w4_work": w4_work,
        **stream,
        **document,
        "wdoc_peak_rss_bytes": wdoc_peak,
        "text_tokens": ours_text,
        "text_identical_to_naive": ours_text == naive_text,
        "answers": answers,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
