"""Loading vision–language models (``AutoModelForImageTextToText``) and their processors.

:func:`preftune.models.load_model` / :func:`~preftune.models.load_tokenizer` hand a model whose
config is a vision–language config (:func:`is_vision_language_source`) to this module:

* the model: ``AutoModelForImageTextToText.from_pretrained`` with the same dtype, attention kernel,
  4-bit and weight-file rules as a text model; for training, the vision tower — the vision
  encoder and its projector / connector into the language model, everything outside the language
  model and the LM head — is frozen unless ``--freeze_vision_tower false``;
* the processing class: ``AutoProcessor.from_pretrained``; it is what preftune passes around as
  "the tokenizer" (saved next to the adapter). Data tokenisation takes the processor (it expands
  each image into its tokens) and reads the text tokenizer as ``processor.tokenizer``
  (:func:`preftune.data.vision.text_tokenizer`); the pad token falls back to EOS as for text models.

LoRA (:func:`vision_lora_targets`, called by :func:`preftune.peft_utils.apply_peft`): the targets
``--lora_target_modules`` resolves to (``all-linear`` / ``ALL``, ``DEFAULT``, names) are taken in
the language model only; with ``--freeze_vision_tower false`` (vision parameters trainable when the
adapter is added) the vision tower's matching linear layers get LoRA too.

Families covered by tests on tiny random models built from their configs:
:data:`preftune.engine.kinds.vision.SUPPORTED_FAMILIES`.
Other vision–language families are refused with :class:`UnsupportedModelError` (some need another
attention pattern for image tokens, e.g. Gemma 3 / PaliGemma, or take images by cross-attention,
e.g. Mllama).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from .config import ModelArguments
from .errors import ModelLoadError, UnsupportedModelError

logger = logging.getLogger("preftune.models")



def _is_vision_config_dict(config: dict) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.get("vision_config") is not None and config.get("model_type") in \
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


@functools.lru_cache(maxsize=32)
def _config_dict(source: str, trust_remote_code: bool) -> dict:
    """The model config of ``source`` as a dict (``{}`` when it cannot be read: the loaders report why)."""
    path = Path(source).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        try:
            return json.loads(config_file.read_text()) if config_file.is_file() else {}
        except (OSError, ValueError):
            return {}
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).to_dict()
    except Exception:  # unreachable / unknown ids: the text loader reports them
        return {}


def _source_is_vision(source: str, trust_remote_code: bool) -> bool:
    return _is_vision_config_dict(_config_dict(source, trust_remote_code))


def is_vision_language_source(model_args: ModelArguments) -> bool:
    """True when ``--model_name_or_path`` names an image-text-to-text model (its config has a
    ``vision_config`` and a model type of ``AutoModelForImageTextToText``). GGUF files and the
    default model are text models."""
    from .models import _find_gguf

    name = model_args.model_name_or_path
    if name is None or _find_gguf(name) is not None:
        return False
    return _source_is_vision(name, bool(model_args.trust_remote_code))


def is_vision_language_model(model: nn.Module) -> bool:
    """True for a (peft-wrapped) vision–language model (``config.vision_config`` set)."""
    from .models import unwrap_peft

    return getattr(getattr(unwrap_peft(model), "config", None), "vision_config", None) is not None


def check_supported(model_args: ModelArguments) -> None:
    """Raises :class:`UnsupportedModelError` for a vision–language family outside
    :data:`preftune.engine.kinds.vision.SUPPORTED_FAMILIES` (read from the config, before any weights)."""
    from .engine.kinds.vision import SUPPORTED_FAMILIES
    from .models import resolve_model_source

    name = model_args.model_name_or_path
    model_type = _config_dict(resolve_model_source(model_args), bool(model_args.trust_remote_code)).get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"--model_name_or_path {name}: vision–language model type {model_type!r} is not supported; preftune "
            f"trains {', '.join(f'{v} ({k})' for k, v in SUPPORTED_FAMILIES.items())}")


def load_processor(model_args: ModelArguments):
    """The model's ``AutoProcessor``; its tokenizer's pad token falls back to EOS (logged).

    Raises:
        ModelLoadError: no processor with an image processor can be loaded, or the tokenizer has
            neither pad nor EOS token.
    """
    from transformers import AutoProcessor

    from .data.vision import is_processor
    from .models import _from_pretrained, resolve_model_source

    check_supported(model_args)
    source = model_args.tokenizer_name_or_path if getattr(model_args, "tokenizer_name_or_path", None) \
        else resolve_model_source(model_args)
    processor = _from_pretrained(AutoProcessor, "processor", model_args, source,
                                 trust_remote_code=model_args.trust_remote_code)
    if not is_processor(processor):
        raise ModelLoadError(f"--model_name_or_path {model_args.model_name_or_path}: a vision–language model, but "
                             f"{source} holds no image processor (AutoProcessor gave {type(processor).__name__})")
    tok = processor.tokenizer
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"tokenizer of {source} has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
        logger.info("Tokenizer of %s has no pad token; using the eos token %r", source, tok.eos_token)
    return processor


def load_vision_model(model_args: ModelArguments, *, training: bool = True, load_in_4bit: bool = False,
                      reward_model: bool = False):
    """``AutoModelForImageTextToText`` for ``model_args`` (see the module docstring).

    ``training``: ``use_cache`` off, vision tower frozen unless ``freeze_vision_tower`` is False.
    Otherwise eval mode, every parameter frozen.

    Raises:
        UnsupportedModelError: a family outside ``SUPPORTED_FAMILIES``, or ``reward_model`` (no
            vision–language reward models yet).
        ModelLoadError: as :func:`preftune.models.load_model`.
    """
    from transformers import AutoModelForImageTextToText

    from .models import (
        _TORCH_DTYPES,
        _check_attn_implementation,
        _from_pretrained,
        check_weight_files,
        resolve_model_source,
    )

    name = model_args.model_name_or_path
    if reward_model:
        raise UnsupportedModelError(f"--model_name_or_path {name}: --loss rm (a reward model) is not supported for "
                                    "vision–language models yet")
    check_supported(model_args)
    _check_attn_implementation(model_args.attn_implementation)
    dtype = _TORCH_DTYPES.get(model_args.dtype, model_args.dtype)
    kwargs: dict[str, Any] = {}
    if load_in_4bit:  # bitsandbytes NF4 on the current CUDA device, else on the CPU (models_quant)
        from .config import PeftArguments
        from .models_quant import quantization_kwargs

        kwargs.update(quantization_kwargs(PeftArguments(load_in_4bit=True)))
    source = resolve_model_source(model_args)
    check_weight_files(source, model_args.allow_pickle_weights)
    if not model_args.allow_pickle_weights:
        kwargs["use_safetensors"] = True
    model = _from_pretrained(AutoModelForImageTextToText, "model", model_args, source, dtype=dtype,
                             attn_implementation=model_args.attn_implementation,
                             trust_remote_code=model_args.trust_remote_code, **kwargs)
    if load_in_4bit:
        from .models_quant import limit_cpu_weight_packing

        limit_cpu_weight_packing(model, training)
    if training:
        model.config.use_cache = False
        if getattr(model_args, "freeze_vision_tower", True):
            frozen = freeze_vision_tower(model)
            logger.info("vision tower frozen (%d tensors; --freeze_vision_tower false trains it)", frozen)
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def freeze_vision_tower(model: nn.Module) -> int:
    """``requires_grad=False`` on the vision encoder and its projector (everything outside the
    language model and the LM head); returns how many parameter tensors were frozen."""
    from .engine.kinds.vision import vision_parameters

    params = vision_parameters(model)
    for _, p in params:
        p.requires_grad_(False)
    return len(params)


def _linear_names(module: nn.Module, prefix: str) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [f"{prefix}.{n}" if prefix else n for n, m in module.named_modules() if n and isinstance(m, (nn.Linear, Conv1D))]


def vision_lora_targets(model: nn.Module, resolved: str | list[str]) -> list[str]:
    """Full module names for peft's ``target_modules`` on a vision–language model.

    ``resolved``: what :func:`preftune.peft_utils.resolve_target_modules` made of
    ``--lora_target_modules`` — ``"all-linear"`` (every linear layer) or leaf names (``q_proj`` ...).
    They are taken in the language model (``model.get_decoder()``) and, when the vision tower is
    trainable (``--freeze_vision_tower false``: some vision parameter has ``requires_grad``), in
    the vision tower and projector too. The LM head is never a target.

    Raises:
        ModelLoadError: no linear layer matches.
    """
    from .engine.kinds.causal import get_decoder_and_head
    from .engine.kinds.vision import vision_parameters

    names = dict(model.named_modules())
    lm, head = get_decoder_and_head(model)
    lm_prefix = next(n for n, m in names.items() if m is lm)
    candidates = _linear_names(lm, lm_prefix)
    vision = vision_parameters(model)
    train_vision = any(p.requires_grad for _, p in vision)
    if train_vision:
        owners = {n.rsplit(".", 1)[0] for n, _ in vision}
        candidates += [n for n in _linear_names(model, "") if n in owners and not n.startswith(lm_prefix + ".")]
    head_names = {n for n, m in names.items() if m is head}
    candidates = [n for n in candidates if n not in head_names]
    if resolved != "all-linear":
        leaves = set(resolved)
        candidates = [n for n in candidates if n.rsplit(".", 1)[-1] in leaves or n in leaves]
    if not candidates:
        raise ModelLoadError(f"--lora_target_modules {resolved}: no linear layer of the language model "
                             f"({type(lm).__name__}) matches; name its modules (e.g. q_proj v_proj) or use all-linear")
    logger.info("LoRA on %d linear layers of the language model%s", len(candidates),
                " and the vision tower" if train_vision else " (vision tower frozen)")
    return sorted(set(candidates))
