"""Router checkpoints: a Hugging Face model directory plus ``rlrouter.json`` (see
``checkpoints/README.md``). Writes are atomic; loading checks the directory first and
names what is missing or wrong."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rlrouter.router.prompt import PROMPT_FORMAT_VERSION

CHECKPOINT_FORMAT_VERSION = 1
META_FILE = "rlrouter.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CheckpointError(ValueError):
    """A directory that is not a usable rlrouter checkpoint."""


def save_checkpoint(model, tokenizer, out_dir: str | Path, meta: dict[str, Any],
                    extra_dirs: dict[str, str | Path] | None = None) -> Path:
    """Write model, tokenizer and ``rlrouter.json`` into a temp dir, then rename into place.

    ``meta`` must hold ``pool`` (tier descriptors); ``extra_dirs`` are copied inside (e.g.
    ``{"trainer_state": path}`` for exact resume).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        payload = {"format_version": CHECKPOINT_FORMAT_VERSION, "prompt_format_version": PROMPT_FORMAT_VERSION,
                   **meta}
        (tmp / META_FILE).write_text(json.dumps(payload, indent=1, sort_keys=True))
        for name, src in (extra_dirs or {}).items():
            if src and Path(src).is_dir():
                shutil.copytree(src, tmp / name)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_meta(path: str | Path) -> dict:
    """Validate the directory and return its ``rlrouter.json``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint {path}: config.json is missing (not a Hugging Face model directory)")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointError(f"checkpoint {path}: no weights ({' or '.join(WEIGHT_FILES)})")
    for f in TOKENIZER_FILES:
        if not (path / f).is_file():
            raise CheckpointError(f"checkpoint {path}: {f} is missing")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is missing (was it written by rlrouter?)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is not valid JSON ({err})") from None
    version = meta.get("prompt_format_version")
    if version != PROMPT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: prompt format version {version!r}, this rlrouter speaks {PROMPT_FORMAT_VERSION}"
        )
    if not isinstance(meta.get("pool"), list) or not meta["pool"]:
        raise CheckpointError(f"checkpoint {path}: {META_FILE} has no pool")
    return meta


def load_checkpoint(path: str | Path, pool_names: list[str] | None = None, device: str | None = None):
    """(model, tokenizer, meta) from a checkpoint directory, in eval mode, on ``device``
    (default: CUDA when available, else CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrouter.router.model import default_device

    meta = read_meta(path)
    names = [t["name"] for t in meta["pool"]]
    if pool_names is not None and names != list(pool_names):
        raise CheckpointError(
            f"checkpoint {path} routes to tiers {names}, but the recipe's pool has {list(pool_names)}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: cannot be loaded ({err})") from None
    tokenizer.padding_side = "left"
    model.eval()
    return model.to(device or default_device()), tokenizer, meta


def load_router(name_or_path: str):
    """Any causal LM for routing: a preset (``smollm2-135m``), a ``.gguf`` file, a local
    directory or a hub id (GPU users); see ``rlrouter.router.bases``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrouter.router.bases import resolve_base

    location = resolve_base(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location)
    tokenizer.padding_side = "left"
    return model, tokenizer
