"""Loading a model (Hub id, directory, .gguf file or the default) with the class its kind names,
with its tokenizer, LoRA and the training set-up.

The model's kind is decided from its config before any weights are read
(:func:`preftune.models.arch.loading_kind`); it names the transformers class, the processing class,
what a loaded model needs from its tokenizer (``ready``), what ``--freeze_vision_tower`` freezes and
how LoRA is applied (:mod:`preftune.models.peft`).
"""

from __future__ import annotations

import logging
from typing import Optional

from torch import nn

from preftune.config import ModelArguments, PeftArguments
from preftune.errors import ModelLoadError
from preftune.modeling import unwrap_peft

from .arch import auto_class, loading_kind
from .peft import apply_peft
from .quant import limit_cpu_weight_packing, quantization_kwargs
from .source import (
    check_attn_implementation,
    check_weight_files,
    from_pretrained,
    resolve_model_source,
    torch_dtype,
)
from .tokenizer import load_tokenizer

logger = logging.getLogger("preftune.models")


def load_model(model_args: ModelArguments, *, training: bool = True, load_in_4bit: bool = False,
               reward_model: bool = False, quantization: Optional[PeftArguments] = None,
               from_pretrained_kwargs: Optional[dict] = None):
    """Load the model named by ``model_args`` (Hub id, directory, .gguf file or the default).

    The class follows the config (:func:`preftune.models.arch.loading_kind`): encoder–decoder models
    (T5, BART ...) load with ``AutoModelForSeq2SeqLM``, vision–language ones with
    ``AutoModelForImageTextToText``, decoder-only ones with ``AutoModelForCausalLM``; an encoder-only
    model (BERT ...) is refused.

    ``reward_model``: load it as ``AutoModelForSequenceClassification`` with ``num_labels=1``
    instead (the value-head kind): the same body with a scalar head ``score``.

    Args:
        model_args: ``model_name_or_path``, ``dtype``, ``attn_implementation``, ``trust_remote_code``,
            ``model_cache_dir``, ``allow_pickle_weights``, ``freeze_vision_tower``.
        training: True: ``use_cache`` off (needed by gradient checkpointing), a vision tower frozen
            unless ``freeze_vision_tower`` is False. False: eval mode, every parameter frozen (for a
            reference model).
        load_in_4bit: QLoRA 4-bit NF4 base weights (bitsandbytes) with the default options.
        quantization: the ``--load_in_4bit`` / ``--load_in_8bit`` / ``--bnb_4bit_*`` options of these
            arguments (:mod:`preftune.models.quant`; CPU or CUDA); wins over ``load_in_4bit``.
        from_pretrained_kwargs: more ``from_pretrained`` keywords, passed as given over preftune's own
            (``revision``, ``device_map``, ``quantization_config`` ...: TRL's ``model_init_kwargs``).

    Returns:
        A ``PreTrainedModel`` without any quantisation marker (unless quantised).

    Raises:
        UnsupportedModelError: an encoder-only model, a vision–language family preftune does not
            cover, or an encoder–decoder / vision–language model as a reward model.
        ModelLoadError: flash-attn missing for flash_attention_2, bitsandbytes missing for
            4-bit / 8-bit (8-bit: not for vision–language models), the default model not installed,
            pickle-only weights without ``allow_pickle_weights`` (:func:`check_weight_files`), or any
            failure of ``from_pretrained`` (missing directory, Hub id unreachable or unknown, custom
            code without ``trust_remote_code``, broken config), with the cause on one line.
    """
    if quantization is None and load_in_4bit:
        quantization = PeftArguments(load_in_4bit=True)
    check_attn_implementation(model_args.attn_implementation)
    source = resolve_model_source(model_args)
    kind = loading_kind(model_args, source, reward_model=reward_model)
    if quantization is not None and quantization.load_in_8bit and not kind.supports_8bit:
        raise ModelLoadError(f"--load_in_8bit is not supported for {kind.description}; use --load_in_4bit")
    kwargs = quantization_kwargs(quantization) if quantization is not None else {}
    check_weight_files(source, model_args.allow_pickle_weights)
    if not model_args.allow_pickle_weights:
        kwargs["use_safetensors"] = True  # a Hub repo with pickle weights only is refused the same way
    kwargs.update(from_pretrained_kwargs or {})
    with kind.loading():
        model = from_pretrained(
            auto_class(kind), "model", model_args, source, dtype=torch_dtype(model_args.dtype),
            attn_implementation=model_args.attn_implementation, trust_remote_code=model_args.trust_remote_code,
            **kwargs, **kind.load_kwargs())
    if quantization is not None and quantization.load_in_4bit:
        limit_cpu_weight_packing(model, training)
    if training:
        model.config.use_cache = False
        frozen = kind.freezable_parameters(model) if getattr(model_args, "freeze_vision_tower", True) else []
        for _, p in frozen:
            p.requires_grad_(False)
        if frozen:
            logger.info("vision tower frozen (%d tensors; --freeze_vision_tower false trains it)", len(frozen))
    else:
        model.eval()
        model.requires_grad_(False)
    return model


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
            time, frozen, as the "reference" adapter (see :func:`preftune.models.peft.reference_context`).
        reward_model: a reward model (``--loss rm``): sequence classifier with ``num_labels=1`` whose
            ``config.pad_token_id`` is the tokenizer's (transformers reads the reward at the last
            non-pad token); LoRA on the body with the head trained fully.

    Returns:
        ``(model, tokenizer)``; the model is a ``PeftModel`` when LoRA is used. What the model needs
        from its tokenizer is set by its kind (``ready``: a missing ``generation_config.pad_token_id``
        is the tokenizer's).
    """
    peft_args = peft_args or PeftArguments()
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, training=training, reward_model=reward_model, quantization=peft_args)
    loading_kind(model_args, reward_model=reward_model).ready(model, tokenizer)
    if peft_args.use_peft:
        model = apply_peft(model, peft_args, with_reference_adapter=with_reference_adapter)
    return model, tokenizer


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
