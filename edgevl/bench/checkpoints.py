"""Random-weight Qwen3-VL checkpoints built locally.

The test suite and the benchmark cannot download the real weights, so they use
checkpoints made here with the real transformers classes and a byte-level BPE
tokenizer trained on the spot with the Qwen special tokens.  A checkpoint made
here is an ordinary Hugging Face model directory and loads through exactly the
same code path as Qwen/Qwen3-VL-2B-Instruct.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


@dataclass(frozen=True)
class Shapes:
    """Sizes of a Qwen3-VL checkpoint (text decoder and vision encoder)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int | None  # None: the trained tokenizer's size
    mrope_section: tuple[int, int, int]
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    deepstack: tuple[int, ...]
    rope_theta: float = 5_000_000.0
    init_std: float = 0.02


# A model small enough to build and run in seconds in the tests.
TINY = Shapes(
    hidden=64,
    layers=2,
    intermediate=128,
    heads=4,
    kv_heads=2,
    head_dim=16,
    vocab=None,
    mrope_section=(2, 3, 3),
    vision_depth=3,
    vision_hidden=32,
    vision_intermediate=64,
    vision_heads=2,
    deepstack=(0, 1),
    init_std=0.1,
)

# The shapes of Qwen/Qwen3-VL-2B-Instruct: same compute and memory as the real model.
QWEN3_VL_2B = Shapes(
    hidden=2048,
    layers=28,
    intermediate=6144,
    heads=16,
    kv_heads=8,
    head_dim=128,
    vocab=151936,
    mrope_section=(24, 20, 20),
    vision_depth=24,
    vision_hidden=1024,
    vision_intermediate=4096,
    vision_heads=16,
    deepstack=(5, 11, 17),
)

_WORDS = (
    "yes no Yes No YES NO true false the a an is are there any visible defect on weld seam "
    "read text label part which connector type fitted what color count how many number "
    "crack scratch dent ok good bad red green blue black white A B C D E type-A type-B "
    "answer with one of only JSON value name status pass fail image photo picture frame "
    "describe this object left right top bottom missing present open closed zero one two three"
).split()


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(4000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        if rng.random() < 0.2:
            words.append(json.dumps({rng.choice(_WORDS): rng.randint(0, 9)}))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":", "\n"]))
    return lines


def train_bpe(texts: Any, vocab_size: int) -> Any:
    """A byte-level BPE with Qwen's normalizer, pre-tokenizer and decoder, trained on ``texts``."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_tokenizer(out_dir: Path, vocab_size: int = 1024, seed: int = 0) -> Any:
    """Train a byte-level BPE with Qwen's pre-tokenizer and special tokens; save it as a Qwen2Tokenizer."""
    from transformers import Qwen2Tokenizer

    tok = train_bpe(_corpus(seed), vocab_size)
    model = json.loads(tok.to_str())["model"]
    qwen = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=262144,
    )
    qwen.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    qwen.chat_template = resources.files("edgevl.bench").joinpath("chat_template.jinja").read_text()
    qwen.save_pretrained(out_dir)
    return qwen


def qwen3_vl_config(shapes: Shapes, ids: dict[str, int], vocab: int) -> Any:
    """The Qwen3VLConfig of ``shapes`` with the special token ids of the project's tokenizer."""
    from transformers import Qwen3VLConfig

    text = {
        "hidden_size": shapes.hidden,
        "num_hidden_layers": shapes.layers,
        "intermediate_size": shapes.intermediate,
        "num_attention_heads": shapes.heads,
        "num_key_value_heads": shapes.kv_heads,
        "head_dim": shapes.head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "initializer_range": shapes.init_std,
        "tie_word_embeddings": True,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": shapes.rope_theta,
            "mrope_section": list(shapes.mrope_section),
            "mrope_interleaved": True,
        },
    }
    vision = {
        "depth": shapes.vision_depth,
        "hidden_size": shapes.vision_hidden,
        "intermediate_size": shapes.vision_intermediate,
        "num_heads": shapes.vision_heads,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": shapes.hidden,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": list(shapes.deepstack),
        "initializer_range": shapes.init_std,
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    return config


def build_checkpoint(out_dir: Path, shapes: Shapes = TINY, seed: int = 0, dtype: str = "float32") -> Path:
    """Write a random-weight Qwen3-VL model directory (config, weights, tokenizer, preprocessor)."""
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out_dir, seed=seed)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab = shapes.vocab or len(tok)
    config = qwen3_vl_config(shapes, ids, vocab)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch_dtype)
    model.eval()
    if shapes.vocab is None:
        # A random decoder rarely picks one particular token; lengthening the end
        # token's (tied) embedding makes answers end at different, varied lengths
        # as a trained model's do, so batched decoding meets early finishers.
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[ids["<|im_end|>"]] *= 6.0
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out_dir, max_shard_size="2GB")
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "patch_size": 16,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    log.info("built random Qwen3-VL checkpoint in %s", out_dir)
    return out_dir
