"""Helpers of the TRL-shaped API (:mod:`preftune.trl`): model and tokenizer from what a TRL script
passes, a peft ``LoraConfig`` as preftune's LoRA settings, the older keywords, dropout, cache keys."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from preftune.config import ConfigError, ModelArguments, PeftArguments

logger = logging.getLogger("preftune.trl")

# older trainer keyword -> config field (today's spelling)
LEGACY_KEYWORDS = {name: name for name in (
    "beta", "loss_type", "label_smoothing", "max_length", "max_prompt_length", "max_completion_length",
    "truncation_mode", "cpo_alpha", "simpo_gamma", "rpo_alpha", "disable_dropout", "precompute_ref_log_probs",
    "padding_value", "generate_during_eval", "is_encoder_decoder", "model_init_kwargs", "dataset_num_proc",
    "center_rewards_coefficient")}
LEGACY_KEYWORDS["max_target_length"] = "max_completion_length"

# trainer arguments preftune cannot honour, with the reason given in the error
UNSUPPORTED_ARGS = {
    "data_collator": "preftune's engine lays out the batch itself (shared prompt, packing)",
    "preprocess_logits_for_metrics": "the engine never materialises [B, T, V] logits",
    "model_init": "pass the model (a name/path or a loaded model)",
    "optimizer_cls_and_kwargs": "pass optimizers=(optimizer, scheduler) or the config's optim field",
    "quantization_config": "with a loaded model (it quantises a model loaded by name; or use `preftune train "
                           "--load_in_4bit`)",
}

# model_init_kwargs preftune reads itself; every other key goes to from_pretrained as given (revision, device_map ...)
MODEL_INIT_KEYS = ("dtype", "torch_dtype", "attn_implementation", "trust_remote_code")
# LoraConfig fields honoured (-> PeftArguments) and fields without effect on training
_LORA_HONOURED = ("r", "lora_alpha", "lora_dropout", "target_modules")
_LORA_NO_EFFECT = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                   "inference_mode", "runtime_config")


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): the reference-cache key of
    a model passed as an object, whose weights may differ from any file."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def disable_dropout(module: torch.nn.Module) -> None:
    """Set ``p = 0`` on every ``nn.Dropout`` in ``module`` (the model's and LoRA's), as TRL's
    ``disable_dropout``; also on preftune's fused LoRA dropout (``DropoutLinear.dropout_p``)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0


def training_fields(args) -> dict[str, Any]:
    """The ``transformers.TrainingArguments`` fields of ``args`` as keywords (the deprecated
    ``gradient_checkpointing*`` aliases left out: they mirror ``activation_checkpointing*``)."""
    from transformers import TrainingArguments

    skip = {"gradient_checkpointing", "gradient_checkpointing_kwargs", "remove_unused_columns"}
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments)
            if f.init and not f.name.startswith("_") and f.name not in skip}


def model_init(args: Any, quantization_config: Any, where: str) -> dict[str, Any]:
    """``args.model_init_kwargs`` with the trainer's ``quantization_config`` added (TRL forwards both to
    ``from_pretrained``). Raises :class:`ConfigError` when both set ``quantization_config``."""
    init = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in init:
            raise ConfigError(f"{where}: quantization_config given both to the trainer and in model_init_kwargs")
        init["quantization_config"] = quantization_config
    return init


def resolve_model(model: Any, init: dict[str, Any], args: Any, *, reward: bool, where: str):
    """``(model, ModelArguments)`` from a trainer's ``model``: a name/path is loaded (with the
    ``model_init_kwargs`` ``init`` as TRL forwards them: :func:`model_init_arguments`, the other keys
    passed to ``from_pretrained`` as given) as a causal LM, or for a reward model as a sequence classifier
    with one label; a loaded model is described (its ``name_or_path``, dtype and attention kernel) and used
    as it is.

    Raises :class:`ConfigError` for ``model_init_kwargs`` with a loaded model, or (reward) a loaded model that
    is not a one-label sequence classifier; :class:`~preftune.errors.ModelLoadError` as loading does.
    """
    from preftune.models import load_model

    if isinstance(model, str):
        model_args = model_init_arguments(model, init, args.trust_remote_code, where)
        return load_model(model_args, training=True, reward_model=reward,
                          from_pretrained_kwargs=model_init_extras(init)), model_args
    if init:
        raise ConfigError(f"{where}: model_init_kwargs (or quantization_config) given but the model is already "
                          "loaded; pass its name, or load it with those keywords yourself")
    if reward and getattr(getattr(model, "config", None), "num_labels", None) != 1:
        raise ConfigError(f"{where}: reward models require `num_labels=1`: a sequence classifier with one label "
                          "(AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)), or its name")
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    model_args = ModelArguments(model_name_or_path=path or None,
                                dtype=str(getattr(model, "dtype", "float32")).replace("torch.", ""),
                                attn_implementation=getattr(model.config, "_attn_implementation", None) or "sdpa")
    model.config.use_cache = False
    return model, model_args


def model_init_arguments(name: str, init: dict[str, Any], trust_remote_code: bool, where: str) -> ModelArguments:
    """:class:`ModelArguments` for loading ``name`` with TRL's ``model_init_kwargs`` ``init``, as
    ``from_pretrained`` reads them: ``dtype`` / ``torch_dtype`` (a name, a ``torch.dtype`` or ``"auto"``;
    None: float32, TRL's default), ``attn_implementation`` (None or absent: the model's own default, sdpa
    where its class supports it, else eager, as transformers chooses), ``trust_remote_code``. The other
    keys (:func:`model_init_extras`: ``revision``, ``device_map`` ...) go to ``from_pretrained`` as given.
    """
    dtype = init.get("dtype", init.get("torch_dtype"))
    dtype = "float32" if dtype is None else str(dtype).replace("torch.", "")
    trust = bool(init.get("trust_remote_code", trust_remote_code))
    attn = init.get("attn_implementation") or default_attention(name, trust, init.get("revision"))
    return ModelArguments(model_name_or_path=name, dtype=dtype, attn_implementation=attn, trust_remote_code=trust)


def model_init_extras(init: dict[str, Any]) -> dict[str, Any]:
    """The ``model_init_kwargs`` passed to ``from_pretrained`` as given: every key but those
    :func:`model_init_arguments` reads (``revision`` None dropped: the default branch)."""
    return {k: v for k, v in init.items() if k not in MODEL_INIT_KEYS and not (k == "revision" and v is None)}


def default_attention(name: str, trust_remote_code: bool, revision: Optional[str] = None) -> str:
    """The attention kernel ``from_pretrained`` picks for ``name`` (at ``revision``) when none is asked for:
    sdpa where the model's class supports it, else eager (GPT-OSS ...). sdpa when the class cannot be told
    (custom code, a GGUF file, no config yet): loading then says what is wrong."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code,
                                            **({"revision": revision} if revision else {}))
        model_class = MODEL_MAPPING[type(config)]
    except Exception:  # noqa: BLE001 - any failure here is reported by the loading itself
        return "sdpa"
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def declared_router_aux_coef(model: Any):
    """TRL 1.16's ``DPOTrainer`` default of ``router_aux_loss_coef`` for ``model``: the (text) config's
    own coefficient (0.0 when it has none) when the config declares ``output_router_logits``, whatever
    its value; None (preftune's default: the config decides) for a model without router logits."""
    from preftune.modeling import unwrap_peft

    config = getattr(unwrap_peft(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if config is None or not hasattr(config, "output_router_logits"):
        return None
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def ready_tokenizer(tokenizer: Any, model_args: ModelArguments, where: str):
    """The given tokenizer (pad token = eos when missing, logged) or the model's, loaded from its path."""
    from preftune.models import load_tokenizer

    if tokenizer is None:
        if not model_args.model_name_or_path:
            raise ConfigError(f"{where}: no processing_class and the model has no name_or_path to load one from")
        return load_tokenizer(model_args)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"{where}: the tokenizer has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token; using the eos token %r", tokenizer.eos_token)
    return tokenizer


def _targets(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else sorted(value)


def lora_to_peft_args(peft_config: Any, model: torch.nn.Module, *, reward: bool = False) -> PeftArguments:
    """A peft ``LoraConfig`` as :class:`PeftArguments` (r, lora_alpha, lora_dropout, target_modules;
    ``target_modules=None`` becomes peft's default for the model type, e.g. ``q_proj, v_proj`` for Llama).
    A reward model's ``task_type`` and ``modules_to_save`` go to peft as given (:func:`lora_choices`).

    Raises :class:`ConfigError` for another peft config type, a task type other than ``CAUSAL_LM``
    (``SEQ_CLS`` for a reward model), a regex ``target_modules`` string, or any other LoRA option set
    away from peft's default (DoRA, rsLoRA, ``bias``, a policy's ``modules_to_save`` ...): preftune's LoRA
    does not apply those.
    """
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    if not isinstance(peft_config, LoraConfig):
        raise ConfigError(f"peft_config: only peft.LoraConfig is supported, got {type(peft_config).__name__}")
    task = getattr(peft_config.task_type, "value", peft_config.task_type)
    wanted = "SEQ_CLS" if reward else "CAUSAL_LM"
    if task not in (None, wanted):
        raise ConfigError(f"peft_config: task_type {task!r}; this trainer needs {wanted}")
    default = LoraConfig()
    odd = []
    for key in vars(default):
        value = getattr(peft_config, key)
        if key in _LORA_HONOURED + _LORA_NO_EFFECT or value == getattr(default, key):
            continue
        if reward and key == "modules_to_save":
            continue  # peft's own choice (lora_choices)
        odd.append(f"{key}={value!r}")
    if odd:
        raise ConfigError(f"peft_config: {', '.join(odd)} not supported by preftune's LoRA (it honours "
                          f"{', '.join(_LORA_HONOURED)})")
    targets = peft_config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ConfigError(f"peft_config: no target_modules and peft has no default for model type "
                              f"{model_type!r}; give target_modules")
        targets = list(DEFAULT_TARGETS[model_type])
    elif isinstance(targets, str) and targets != "all-linear":
        raise ConfigError(f"peft_config: target_modules {targets!r}: a regex is not supported; give a list "
                          "of module names or 'all-linear'")
    return PeftArguments(use_peft=True, lora_r=peft_config.r, lora_alpha=peft_config.lora_alpha,
                         lora_dropout=peft_config.lora_dropout, lora_target_modules=_targets(targets))


def peft_args_of(peft_model: Any) -> PeftArguments:
    """:class:`PeftArguments` describing the active adapter of a ``PeftModel`` passed to a trainer."""
    cfg = peft_model.peft_config[peft_model.active_adapter]
    return PeftArguments(use_peft=True, lora_r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                         lora_target_modules=_targets(cfg.target_modules))


def lora_choices(peft_config: Any, *, reward: bool) -> dict[str, Any]:
    """:func:`preftune.models.apply_peft`'s ``task_type`` / ``modules_to_save`` for a user's ``LoraConfig``:
    for a reward model, the config's own (peft then decides what trains, as under TRL: task ``SEQ_CLS``
    adds the head ``score`` to ``modules_to_save``, ``LoraConfig()`` leaves it frozen); {} (the model
    kind's choice) for a policy."""
    if not reward:
        return {}
    saved = peft_config.modules_to_save
    return {"task_type": getattr(peft_config.task_type, "value", peft_config.task_type),
            "modules_to_save": list(saved) if saved else None}


def apply_chat_template_path(processing_class: Any, path: Optional[str], where: str) -> None:
    """TRL's ``chat_template_path``: the chat template of a file (Jinja text) or of the tokenizer in a
    directory / Hub id, set on ``processing_class``. Unlike TRL, no tokens are added to the vocabulary (a
    template that needs new special tokens: add them to the tokenizer and model yourself).

    Raises :class:`ConfigError` when ``path`` is neither a readable file nor a tokenizer with a template.
    """
    if path is None:
        return
    if Path(path).is_file():
        template = Path(path).read_text(encoding="utf-8")
    else:
        from transformers import AutoTokenizer

        try:
            template = AutoTokenizer.from_pretrained(path).chat_template
        except (OSError, ValueError) as err:
            raise ConfigError(f"{where}: chat_template_path {path!r}: not a file and no tokenizer there "
                              f"({str(err).splitlines()[0]})") from None
        if not template:
            raise ConfigError(f"{where}: chat_template_path {path!r}: that tokenizer has no chat template")
    processing_class.chat_template = template


def add_model_tags(model: Any, tags: list[str]) -> None:
    """TRL's ``model.add_model_tags(tags)`` (the tags land in the model card), where the model has it."""
    if hasattr(model, "add_model_tags"):
        model.add_model_tags(tags)
