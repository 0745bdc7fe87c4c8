"""Finding and loading the model.

Weights are streamed from the safetensors files into a model skeleton built on
the ``meta`` device, one decoder layer at a time, and converted to the target
precision as they arrive: the process never holds two copies of the weights
(a float32 copy next to the int8 one, or the file mapping next to the tensors).
float32 loads one layer per core, each weight read into its thread's scratch
buffer and, where a trial chose oneDNN (``edgevl.engine.float32_packing``), reordered from there at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import re
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgevl.config import INT8_ROWS, PRECISIONS, PREPARED, Precision
from edgevl.engine import int4_kernel, kernels, row_attention
from edgevl.engine.activations import use_in_place_vision_activation
from edgevl.engine.attention import use_bfloat16_vision_attention, use_grouped_attention
from edgevl.engine.float32_packing import head_transposed, packing_pays
from edgevl.engine.float32_preparing import Preparer
from edgevl.engine.int8_layers import EMBEDDING, Int8Rows, finish_int8, int8_linears
from edgevl.engine.kernels import ChunkedLinear, convert_linear, convert_linears, fbgemm_int8_available, int_mm_fast
from edgevl.engine.model_files import read_tensor_infos, resolve_model_path
from edgevl.engine.packing import Packer, Pending
from edgevl.engine.patches import use_matrix_patch_embedding
from edgevl.engine.prepared import (
    PreparedCorrupt,
    PreparedReader,
    PreparedWriter,
    location,
    prepared_bytes,
    room_for,
)
from edgevl.engine.tuning import usable_cores
from edgevl.engine.weight_reading import Float32Weights, Scratch, packed_at_once, read_converted
from edgevl.errors import ModelError

log = logging.getLogger(__name__)


_LAYER_RE = re.compile(r"^(.*?\.(?:layers|blocks|deepstack_merger_list)\.\d+)\.")
# While loading, allocations above 1 MiB get their own mapping and go back to
# the system when freed; otherwise glibc keeps the freed load-time buffers and
# the resident size stays at its loading peak.  Afterwards the threshold goes
# back to glibc's ceiling (32 MiB), so that inference reuses its buffers instead
# of mapping and faulting in fresh pages for every activation.
_LOAD_MMAP_THRESHOLD = 1 << 20
_RUN_MMAP_THRESHOLD = 32 << 20


@dataclass
class LoadedModel:
    """A loaded Qwen3-VL with the pieces the engine needs around it."""

    model: Any  # Qwen3VLForConditionalGeneration
    tokenizer: Any
    image_processor: Any
    model_id: str
    path: Path
    precision: Precision
    eos_ids: frozenset[int]
    pad_id: int
    image_token_id: int
    vision_end_id: int
    load_seconds: float
    # int8, float32: whether its weights came from a prepared file ("read"), were prepared by this load
    # ("written"; float32: "preparing", by ``preparer``), or were made without one ("none").
    prepared: str = "none"
    # From prepared weights: packs the layers (int8's for fbgemm, float32's for oneDNN) while the model answers.
    packer: Packer | None = None
    # float32 without prepared weights: writes them for the next start while the model answers ("preparing").
    preparer: Preparer | None = None
    threads: int = 1  # the answers' threads, all the cores the worker may use

    @property
    def config(self) -> Any:
        return self.model.config


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Recreate the computed (non-checkpoint) buffers, e.g. RoPE inverse frequencies, on the CPU."""
    for name, module in model.named_modules():
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise ModelError(f"cannot materialise the buffers of {name}", "model_unsupported")
        with torch.device("cpu"):
            fresh = type(module)(config)
        for buf_name, buf in fresh.named_buffers(recurse=False):
            module.register_buffer(buf_name, buf, persistent=buf_name not in fresh._non_persistent_buffers_set)


def _set_mmap_threshold(size: int) -> None:
    # Fixing M_MMAP_THRESHOLD also freezes glibc's trim threshold, which it would
    # otherwise keep at twice the mmap threshold; it is set alongside, or freed
    # activation memory would be returned and faulted in again at every step.
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, size)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2 * size)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _trim_heap() -> None:
    """Give the heap space freed while loading back to the system before inference starts."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ModelError(f"checkpoint tensor {key} has no place in the model", "model_unsupported") from None
    current = module._parameters.get(attr)
    if current is None:
        raise ModelError(f"checkpoint tensor {key} has no place in the model", "model_unsupported")
    if tuple(current.shape) != tuple(tensor.shape):
        raise ModelError(
            f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(current.shape)}",
            "model_unsupported",
        )
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def _stream_weights(model: nn.Module, path: Path, dtype: torch.dtype, precision: Precision,
                    source: Int8Rows, packs: bool, kept: Float32Weights) -> set[str]:
    from safetensors import safe_open

    files = {info.name: info.file for info in read_tensor_infos(path)}
    # One group per layer, or per module outside the layers; each group is
    # converted to its kernels as soon as it is loaded.
    groups: dict[str, list[str]] = defaultdict(list)
    for key in files:
        match = _LAYER_RE.match(key)
        groups[match.group(1) if match else key.rpartition(".")[0].rpartition(".")[0]].append(key)
    owners = frozenset(groups)
    scratch = Scratch()

    def load(owner: str) -> None:
        keys = groups[owner]
        for file in sorted({files[key] for key in keys}):  # a layer may span two shards
            with safe_open(str(file), framework="pt") as f:
                for key in (key for key in keys if files[key] == file):
                    if source.has(key):
                        continue  # its int8 rows are prepared: the file's weights are not read at all
                    mapped = kept.take(key)
                    if mapped is not None:  # float32, prepared: mapped as it is, packed behind the answers if at all
                        _assign(model, key, mapped)
                        continue
                    if packs and packed_at_once(model, key):
                        _assign(model, key, scratch.read(f, key))
                        # Reordered into memory of its own: the scratch is free for the next weight.
                        convert_linear(model, key.rpartition(".")[0], precision, packs)
                        continue
                    # int8 quantizes the token embedding from the file's rows (see Int8Embedding).
                    target = torch.bfloat16 if precision in INT8_ROWS and key == EMBEDDING else dtype
                    _assign(model, key, read_converted(f, key, target))
        if precision in INT8_ROWS:  # its own modules: each group's owner is another thread's
            int8_linears(model.get_submodule(owner), owner, source, owners - {owner})
        else:  # only the group's own layers: another thread may be filling the rest of the model
            for name in dict.fromkeys(key.rpartition(".")[0] for key in keys):
                convert_linear(model, name, precision, packs)

    # float32: converting a layer into fresh memory, and reordering it for oneDNN where that pays, keeps about
    # one core busy (both ran at about 1 GB/s with one thread or two), so the layers are loaded one per core, as
    # are int8's prepared rows, each packed for fbgemm as it is mapped (one thread packed 12 matrices of 6144x2048
    # in 1.4-1.5 s on a 2-core host, two 0.75-0.85 s).  A first int8 start writes its prepared file in this
    # order; bfloat16 only reads.
    if not (precision == "float32" or (precision in INT8_ROWS and source.reader is not None)):
        for owner in sorted(groups):
            load(owner)
        return set(files)
    # float32 reorders on one thread per layer, the pool keeping both cores busy: two threads in each (four
    # faulting in fresh memory on 2 cores) loaded the 2B model in 10.2-14.4 s against 9.6-11.6 s (faster in 6 of
    # 7 alternations); int8's prepared rows pack faster with two (11.3-12.2 s against 12.0-13.6 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if precision == "float32" else threads)
    with ThreadPoolExecutor(usable_cores()) as pool:
        # int8's tied head is its largest matrix to pack: first, so that it ends with the layers, not after them.
        futures = ([pool.submit(source.pack_tied_head)] if precision in INT8_ROWS and "lm_head.weight" not in files
                   else [])
        futures += [pool.submit(load, owner) for owner in sorted(groups)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:  # a checkpoint that does not fit stops the load, not after every layer
                future.cancel()
            raise
        finally:
            torch.set_num_threads(threads)
    return set(files)


def _build(config: Any, path: Path, precision: Precision, source: Int8Rows, kept: Float32Weights) -> Any:
    """The model with its weights streamed in and converted to ``precision``'s kernels."""
    from transformers import Qwen3VLForConditionalGeneration

    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    use_grouped_attention(model)
    use_in_place_vision_activation(model)
    if precision in INT8_ROWS and kernels.bfloat16_attention_fast():
        use_bfloat16_vision_attention(model)
    _rebuild_meta_buffers(model)
    packs = precision == "float32" and packing_pays(config)  # timed before the load takes both cores
    behind = packs and kept.reader is not None  # mapped weights answer at once, and are packed behind the answers
    _set_mmap_threshold(_LOAD_MMAP_THRESHOLD)
    try:
        loaded = _stream_weights(model, path, dtype, precision, source, packs and not behind, kept)
        if "lm_head.weight" not in loaded:
            # Tied output head (Qwen3-VL-2B): the embedding matrix serves both.
            model.lm_head.weight = model.model.language_model.embed_tokens.weight
        if precision in INT8_ROWS:
            finish_int8(model, source)
        else:
            # Mergers and other loose Linear layers (behind the answers: every Linear, noted for the packer); a
            # tied output head stays a dense nn.Linear because packing it would duplicate the embedding matrix.
            if behind:
                kept.defer_all(model, "" if "lm_head.weight" in loaded else "model")
            else:
                convert_linears(model if "lm_head.weight" in loaded else model.model, precision, packs)
            if "lm_head.weight" not in loaded and precision == "float32":
                model.lm_head = ChunkedLinear(model.lm_head, head_transposed(config))
    finally:
        _set_mmap_threshold(_RUN_MMAP_THRESHOLD)
        _trim_heap()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}", "model_unsupported")
    return model


def _prepared_sources(precision: Precision, prepared_dir: Path, path: Path, prefill_copy: bool,
                      four: ctypes.CDLL | None) -> tuple[Int8Rows, Float32Weights, Path]:
    """Where a load's int8 rows or float32 weights come from (a prepared file), and int8's go to (a new one, where
    there is room for it: ``prepared.room_for``); float32's are written after the load (``Preparer``)."""
    base = location(prepared_dir, path, precision)
    reader = PreparedReader.open(base)
    if precision == "float32":
        return Int8Rows(None, None, None, prefill_copy), Float32Weights(reader), base
    writer = None
    if reader is None and room_for(prepared_dir, prepared_bytes(path, precision)):
        try:
            writer = PreparedWriter(base)
        except OSError as exc:
            log.warning("cannot prepare the int8 weights in %s: %s", prepared_dir, exc.strerror or exc)
    # Mapped rows answer at once where fbgemm will take over, if _int_mm is fast here (otherwise each layer is
    # packed as it is mapped: an answer at _int_mm's rate would come after the packing anyway); without fbgemm
    # they are the kernel's for good.
    defer = reader is not None and fbgemm_int8_available() and int_mm_fast()
    return Int8Rows(reader, writer, [] if defer else None, prefill_copy, four), Float32Weights(), base


def _build_prepared(config: Any, path: Path, precision: Precision, prepared_dir: Path, prefill_copy: bool,
                    four: ctypes.CDLL | None) -> tuple[Any, str, list[Pending], Path]:
    """The int8 or float32 model from its prepared weights (int8: or preparing them); a damaged file is rebuilt,
    never used.  Also the layers whose packing is left to a ``Packer``, and the prepared file's name."""
    source, kept, base = _prepared_sources(precision, prepared_dir, path, prefill_copy, four)
    reader = source.reader or kept.reader
    try:
        model = _build(config, path, precision, source, kept)
    except PreparedCorrupt as exc:
        log.warning("the prepared %s weights %s are damaged (%s): they are made again from the model", precision,
                    base, exc)
        assert reader is not None
        reader.discard()
        source, kept, _ = _prepared_sources(precision, prepared_dir, path, prefill_copy, four)
        reader = None
        model = _build(config, path, precision, source, kept)
    except BaseException:
        if source.writer is not None:
            source.writer.abort()
        raise
    if reader is not None:
        return model, "read", [*(source.deferred or []), *kept.deferred], base
    written = source.writer is not None and source.writer.commit()
    return model, "written" if written else "none", [], base


def _preparer(precision: Precision, prepared: str, path: Path, prepared_dir: Path, base: Path) -> Preparer | None:
    """A float32 load without prepared weights: the writer of them for the next start, where there is room."""
    if precision != "float32" or prepared != "none" or not room_for(prepared_dir, prepared_bytes(path, precision)):
        return None
    return Preparer(path, base)


def load_model(model_id: str, precision: Precision = "float32", threads: int = 0,
               prepared_dir: Path | None = None, pack_gate: threading.Event | None = None,
               prefill_copy: bool = True) -> LoadedModel:
    """Load Qwen3-VL for the CPU in the given precision; ``threads`` 0 means one per usable core.

    ``prefill_copy`` (int8): whether a second packed copy for the prefill may be kept (``onednn_int8.ByRows``).

    ``prepared_dir`` (int8, float32): where the quantized rows or the float32 weights are kept between starts (see
    ``edgevl.engine.prepared``).  A start from them may return before its packing is done (int8's for fbgemm where
    ``_int_mm`` answers meanwhile, float32's for oneDNN where its trial chose it: ``LoadedModel.packer``, started
    here; with ``pack_gate``, once that is set).
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}", "config_invalid")
    started = time.monotonic()
    threads = threads or usable_cores()
    torch.set_num_threads(threads)
    path = resolve_model_path(model_id)
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "qwen3_vl":
        raise ModelError(f"{model_id} is a {config.model_type} model; edgevl runs Qwen3-VL", "model_unsupported")
    # int4's kernel is built beside the prepared weights, in the state directory.
    kernel_dir = prepared_dir.parent / "kernels" if prepared_dir else None
    four = int4_kernel.library(kernel_dir) if precision == "int4" else None
    prepared = "none"
    packer: Packer | None = None
    preparer: Preparer | None = None
    if precision in PREPARED and prepared_dir is not None:
        model, prepared, deferred, base = _build_prepared(config, path, precision, prepared_dir, prefill_copy, four)
        if deferred:
            packer = Packer(model, deferred, pack_gate, prefill_copy)
            packer.start()
        preparer = _preparer(precision, prepared, path, prepared_dir, base)
        prepared = preparer.outcome if preparer is not None else prepared
    else:
        model = _build(config, path, precision, Int8Rows(None, None, None, prefill_copy, four), Float32Weights())
    model.eval()
    if precision in INT8_ROWS:
        use_matrix_patch_embedding(model)
    if four is not None:
        row_attention.install(model, four)

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        for name in ("chat_template.jinja", "chat_template.json"):
            file = path / name
            if file.is_file():
                text = file.read_text()
                tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        else:
            raise ModelError(f"{path} has no chat template", "model_unsupported")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    eos = tokenizer.eos_token_id
    if (path / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(path)
        model.generation_config = gen
        eos = gen.eos_token_id if gen.eos_token_id is not None else eos
    eos_ids = frozenset([eos] if isinstance(eos, int) else eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    seconds = time.monotonic() - started
    if preparer is not None:  # once the model can answer: a load that fails prepares nothing
        preparer.start()
    log.info("loaded %s (%s) in %.1f s%s", model_id, precision, seconds,
             {"read": f" from its prepared {precision} weights",
              "written": f"; its {precision} weights are prepared for the next start",
              "preparing": f"; its {precision} weights are being prepared for the next start"}.get(prepared, ""))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        model_id=model_id,
        path=path,
        precision=precision,
        eos_ids=eos_ids,
        pad_id=int(pad),
        image_token_id=int(config.image_token_id),
        vision_end_id=int(config.vision_end_token_id),
        load_seconds=seconds,
        prepared=prepared,
        packer=packer,
        preparer=preparer,
        threads=threads,
    )
