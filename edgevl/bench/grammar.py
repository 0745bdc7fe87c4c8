"""What a schema costs per generated token: the grammar mask, measured with a tokenizer of Qwen's size.

The cost of a mask grows with the tokenizer's vocabulary, and the benchmark's
checkpoint carries a small trained tokenizer.  This measurement trains (once,
cached beside the checkpoint) a byte-level BPE of Qwen's 151,643 tokens with
Qwen's pre-tokenizer on the Python standard library's sources, which every
machine has, then walks a document schema with random allowed tokens and times
each step of the engine's own constraint: the mask computed by llguidance and
turned into the boolean mask the engine applies to the log-probabilities.
"""

from __future__ import annotations

import json
import random
import statistics
import sysconfig
import time
from pathlib import Path
from typing import Any

QWEN_VOCAB = 151_643
CORPUS_CHARS = 60_000_000
# An invoice's fields: strings, a number, a bounded list of line items.
DOCUMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "sender": {"type": "string", "maxLength": 80},
        "date": {"type": "string", "maxLength": 20},
        "number": {"type": "string", "maxLength": 32},
        "total": {"type": "number"},
        "lines": {"type": "array", "maxItems": 5, "items": {
            "type": "object", "required": ["item", "qty"],
            "properties": {"item": {"type": "string", "maxLength": 40},
                           "qty": {"type": "integer", "minimum": 0, "maximum": 1000}}}},
    },
    "required": ["sender", "date", "number", "total"],
}
WALKS = 20


def _corpus(chars: int) -> Any:
    read = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        read += len(text)
        yield text
        if read > chars:
            return


def qwen_sized_tokenizer(cache: Path, vocab: int = QWEN_VOCAB, corpus_chars: int = CORPUS_CHARS) -> str:
    """The tokenizer's JSON, trained on first use and kept in ``cache``."""
    if cache.is_file():
        return cache.read_text()
    from edgevl.bench.checkpoints import train_bpe

    tok = train_bpe(_corpus(corpus_chars), vocab)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    text = str(tok.to_str())
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".partial")
    tmp.write_text(text)
    tmp.replace(cache)
    return text


def mask_costs(cache: Path, model_vocab: int = 151_936, vocab: int = QWEN_VOCAB,
               corpus_chars: int = CORPUS_CHARS) -> dict[str, float]:
    """Compile time of the document schema and the engine's per-token constraint cost (median, p99, max)."""
    import llguidance
    import numpy as np
    from llguidance import LLMatcher

    from edgevl.engine.grammar import Constraint
    from edgevl.schemas import grammar_for

    text = qwen_sized_tokenizer(cache, vocab, corpus_chars)
    eos = json.loads(text)["added_tokens"][-1]["id"]
    tokenizer = llguidance.LLTokenizer(text, eos_token=eos)
    grammar = grammar_for(json.dumps(DOCUMENT_SCHEMA, separators=(",", ":")))
    started = time.perf_counter()
    pristine = LLMatcher(tokenizer, grammar, log_level=0)
    compile_seconds = time.perf_counter() - started
    rng = random.Random(0)
    steps: list[float] = []
    for _ in range(WALKS):
        constraint = Constraint(pristine.deep_copy(), model_vocab)
        while not constraint.complete and len(steps) < 100_000:
            started = time.perf_counter()
            allowed = constraint.allowed()
            steps.append(time.perf_counter() - started)
            token = int(rng.choice(np.flatnonzero(allowed.numpy())))
            constraint.accept(token)
            if constraint.failed:
                raise RuntimeError(f"the grammar failed: {constraint.failed}")
    steps.sort()
    return {
        "vocab": float(tokenizer.vocab_size),
        "compile_ms": round(compile_seconds * 1000, 2),
        "tokens": float(len(steps)),
        "median_us": round(statistics.median(steps) * 1e6, 1),
        "p99_us": round(steps[int(len(steps) * 0.99)] * 1e6, 1),
        "max_us": round(steps[-1] * 1e6, 1),
    }
