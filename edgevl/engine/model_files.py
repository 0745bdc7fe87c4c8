"""The model's files on disk: where they are, and what their tensors are, without loading them.

Nothing here imports torch: the daemon uses it to find the model and size its
memory before a worker process loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevl.errors import ModelError

# safetensors stores this many bytes of JSON header at most (its own limit).
_MAX_HEADER = 100 << 20


def model_version(model_dir: Path) -> str:
    """The model's files by name, size and modification time: a replaced checkpoint is a new model."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".json", ".safetensors", ".jinja"))
    listing = json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files], sort_keys=True)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def resolve_model_path(model_id: str) -> Path:
    """A local directory, or a Hugging Face repo id looked up in the local cache only (no network)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model directory (no config.json)", "model_missing")
        return path
    if model_id.startswith(("/", ".", "~")) or model_id.count("/") != 1:
        raise ModelError(f"model directory {model_id} does not exist", "model_missing")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=model_id, local_files_only=True))
    except Exception:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise ModelError(
            f"model {model_id} is not in the local Hugging Face cache ({cache}); "
            f"fetch it on a connected machine with: edgevl model pull {model_id}",
            "model_missing",
        ) from None


def pull_model(model_id: str) -> Path:
    """Download a model into the local Hugging Face cache, with a progress bar."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id=model_id, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises a dozen kinds for "no network" alone
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot download {model_id}: {reason}. Without a network, pull it on a connected "
                         "machine and copy the Hugging Face cache, or a model directory as model.id",
                         "model_unavailable") from None


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if not single.is_file():
        raise ModelError(f"{path} holds no model.safetensors weights", "model_missing")
    return [single]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path  # the safetensors file holding it
    offset: int = 0  # where its bytes start in the file

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


def read_tensor_infos(path: Path) -> list[TensorInfo]:
    """Names, dtypes and shapes of every tensor in the model, from the safetensors headers only."""
    infos = []
    for file in checkpoint_files(path):
        try:
            with file.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > _MAX_HEADER:
                    raise ValueError(f"header of {size} bytes")
                header: dict[str, Any] = json.loads(f.read(size))
        except (OSError, ValueError, struct.error) as exc:
            raise ModelError(f"{file} is not a readable safetensors file: {exc}", "model_unsupported") from None
        for name, entry in header.items():
            if name != "__metadata__":
                infos.append(TensorInfo(name, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]), file,
                                        8 + size + int(entry.get("data_offsets", [0])[0])))
    return infos


def read_config(path: Path) -> dict[str, Any]:
    try:
        config: dict[str, Any] = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path / 'config.json'} is not readable: {exc}", "model_unsupported") from None
    return config
