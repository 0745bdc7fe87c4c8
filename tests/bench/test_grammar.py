"""The benchmark's measurement of a schema's cost per token, on a small tokenizer trained the same way."""

from __future__ import annotations

from pathlib import Path

from edgevl.bench.grammar import mask_costs


def test_the_mask_is_timed_along_complete_walks_and_the_tokenizer_is_trained_once(tmp_path: Path) -> None:
    cache = tmp_path / "tokenizer.json"
    costs = mask_costs(cache, model_vocab=4096, vocab=2000, corpus_chars=2_000_000)
    assert costs["vocab"] == 2003  # the trained tokens and three special ones
    assert costs["tokens"] >= 20 * 10, "twenty walks through the schema, each at least its required keys"
    assert 0 < costs["median_us"] <= costs["p99_us"] <= costs["max_us"]
    trained = cache.read_text()
    again = mask_costs(cache, model_vocab=4096, vocab=2000, corpus_chars=2_000_000)
    assert cache.read_text() == trained
    assert again["tokens"] == costs["tokens"], "the same walks (a fixed seed) on the same tokenizer"
