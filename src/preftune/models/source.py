"""Where a model comes from (Hub id, directory, GGUF file, the default) and reading it safely.

:func:`resolve_model_source` turns ``--model_name_or_path`` into what ``from_pretrained`` loads (a
GGUF file becomes its cached conversion, :mod:`preftune.models.gguf`); :func:`check_weight_files`
refuses pickle-only weights unless allowed; :func:`from_pretrained` turns loading failures into
one-line :class:`~preftune.errors.ModelLoadError` messages; :func:`source_config` reads the config
before any weights.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from preftune.config import ModelArguments
from preftune.errors import ModelLoadError

from .gguf import default_model_path, ensure_gguf_converted, find_gguf, model_cache_root

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_source(model_args: ModelArguments) -> str:
    """What ``from_pretrained`` should load: a Hub id or directory (a GGUF file becomes its cache dir).

    ``model_name_or_path=None`` means :func:`default_model_path`.
    """
    name = model_args.model_name_or_path or default_model_path()
    gguf = find_gguf(name)
    if gguf is None:
        return name
    return str(ensure_gguf_converted(gguf, model_cache_root(model_args), model_args.trust_remote_code))


# Weight files transformers reads with pickle (torch.load) when a directory has no safetensors.
PICKLE_WEIGHT_GLOBS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json")


def check_weight_files(source: str, allow_pickle: bool) -> None:
    """Refuse a local model directory whose weights exist only as pickle files, unless allowed.

    Unpickling (``torch.load``) an untrusted ``pytorch_model.bin`` can run arbitrary code, so a
    directory without any ``*.safetensors`` but with ``pytorch_model*.bin`` is an error unless
    ``allow_pickle`` (``--allow_pickle_weights``) is set. A Hub id is not checked here: without
    ``allow_pickle`` :func:`load_model` passes ``use_safetensors=True``, which refuses the same.

    Raises:
        ModelLoadError: pickle-only weights and ``allow_pickle`` is False (names the files), or a
            directory without any weight file.
    """
    path = Path(source)
    if not path.is_dir() or any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return
    pickles = sorted({p.name for pattern in PICKLE_WEIGHT_GLOBS for p in path.glob(pattern)})
    if not pickles:
        raise ModelLoadError(f"--model_name_or_path {source}: no weight files in this directory "
                             "(expected model.safetensors or model-*-of-*.safetensors)")
    if not allow_pickle:
        raise ModelLoadError(
            f"--model_name_or_path {source}: the weights are pickle files only ({', '.join(pickles)}), no "
            "safetensors; loading a pickle can run arbitrary code. Convert them to safetensors, or pass "
            "--allow_pickle_weights true if you trust where the files come from")


def _one_line(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: " + (text if len(text) <= limit else text[:limit] + " ...")


def from_pretrained(loader, what: str, model_args: ModelArguments, source: str, **kwargs):
    """``loader.from_pretrained(source, **kwargs)`` with its failures turned into one-line
    :class:`ModelLoadError` messages naming the model, what failed and what to do."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        cause = _one_line(err)
        name = model_args.model_name_or_path or source
        if Path(source).expanduser().exists():
            text = f"--model_name_or_path {name}: cannot load the {what} from {source} ({cause})"
        elif source.startswith(("/", ".", "~")) or source.count("/") > 1:
            text = f"--model_name_or_path {name}: no such directory (and not a Hub model id)"
        else:
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            text = (f"--model_name_or_path {name}: not a local directory, and loading the {what} from the "
                    f"Hugging Face Hub failed ({cause}). "
                    + ("HF_HUB_OFFLINE is set, so only models already in the local Hub cache can be loaded"
                       if offline else "Check the id, the network, and HF_TOKEN for gated models"))
        if "trust_remote_code" in str(err) and not model_args.trust_remote_code:
            text += ". The model needs its own Python code, which preftune does not run unless you pass " \
                    "--trust_remote_code true (only for code you trust)"
        elif "safetensors" in str(err) and not model_args.allow_pickle_weights:
            text += ". Only safetensors weights are loaded by default; pass --allow_pickle_weights true to " \
                    "load pickle weights (pytorch_model.bin) you trust"
        raise ModelLoadError(text) from err



def torch_dtype(name: str):
    """``torch.float32`` ... for ``--dtype`` names; other values (``"auto"``) as given."""
    return TORCH_DTYPES.get(name, name)


def check_attn_implementation(name: str) -> None:
    """Raises :class:`ModelLoadError` for ``flash_attention_2`` without the flash-attn package."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelLoadError("--attn_implementation flash_attention_2 needs the flash-attn package "
                             "(`pip install flash-attn`, CUDA only); or use sdpa or eager")


def source_config(model_args: ModelArguments, source: str | None = None) -> Any:
    """The ``PretrainedConfig`` of the model ``model_args`` names (``source``: already resolved), or
    None when it cannot be read (the model loading reports why)."""
    if source is None:
        source = resolve_model_source(model_args)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source), trust_remote_code=bool(model_args.trust_remote_code))
    except Exception:  # a broken / unreachable source: from_pretrained reports it with its own message
        return None
