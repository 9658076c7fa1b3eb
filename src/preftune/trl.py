"""A Python API with TRL's shape: ``from preftune.trl import DPOConfig, DPOTrainer`` instead of ``from trl``.

``CPOTrainer``, ``DPOTrainer`` and ``ORPOTrainer`` take TRL 1.16's constructor (same keywords, same
positional order) and run preftune's recipe (:mod:`preftune.train`): the model (a name/path or a
loaded ``PreTrainedModel`` / ``PeftModel``), LoRA from a peft ``LoraConfig``, the data through
:mod:`preftune.data` (a ``datasets.Dataset`` or a list of dicts in any supported format), reference
log-probs, and a :class:`preftune.trainer.PreferenceTrainer` — a ``transformers.Trainer``, so
``.train()``, ``.evaluate()``, ``.save_model()``, ``.state.log_history`` and callbacks are the usual ones.
The configs are in :mod:`preftune.trl_config`; the field mapping is in ``docs/python-api.md``.

Older TRL keywords still work, with one logged line naming today's spelling: ``tokenizer=`` (now
``processing_class=``) and the loss/data settings that used to go to the trainer (``beta=``,
``max_length=``, ``max_prompt_length=``, ``max_target_length=`` ...; now fields of the config).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import logging
from typing import Any, ClassVar, Optional

import torch

from preftune.cli_args import config_to_yaml
from preftune.config import ConfigError, ModelArguments, PeftArguments
from preftune.trainer import PreferenceTrainer
from preftune.trl_config import CPOConfig, DPOConfig, ORPOConfig, _TRLConfig

__all__ = ["CPOConfig", "CPOTrainer", "DPOConfig", "DPOTrainer", "ORPOConfig", "ORPOTrainer"]

logger = logging.getLogger("preftune.trl")

# older trainer keyword -> config field (today's spelling)
LEGACY_KEYWORDS = {name: name for name in (
    "beta", "loss_type", "label_smoothing", "max_length", "max_prompt_length", "max_completion_length",
    "truncation_mode", "cpo_alpha", "simpo_gamma", "rpo_alpha", "disable_dropout", "precompute_ref_log_probs",
    "padding_value", "generate_during_eval", "is_encoder_decoder", "model_init_kwargs", "dataset_num_proc")}
LEGACY_KEYWORDS["max_target_length"] = "max_completion_length"
# LoraConfig fields honoured (→ PeftArguments) and fields without effect on training
_LORA_HONOURED = ("r", "lora_alpha", "lora_dropout", "target_modules")
_LORA_NO_EFFECT = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                   "inference_mode", "bias", "runtime_config")
_MODEL_INIT_KEYS = ("dtype", "torch_dtype", "attn_implementation", "trust_remote_code")
_UNSUPPORTED_ARGS = {
    "data_collator": "preftune's engine lays out the batch itself (shared prompt, packing)",
    "preprocess_logits_for_metrics": "the engine never materialises [B, T, V] logits",
    "compute_metrics": "the engine never materialises logits; the metrics are TRL's reward/logps set",
    "model_init": "pass the model (a name/path or a loaded model)",
    "quantization_config": "for QLoRA use `preftune train --load_in_4bit` (4-bit NF4 through bitsandbytes)",
}


def _fingerprint(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes): the reference-cache key of a
    model passed as an object, whose weights may differ from any file."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _disable_dropout(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def lora_to_peft_args(peft_config: Any, model: torch.nn.Module) -> PeftArguments:
    """A peft ``LoraConfig`` as :class:`PeftArguments` (r, lora_alpha, lora_dropout, target_modules;
    ``target_modules=None`` becomes peft's default for the model type, e.g. ``q_proj, v_proj`` for Llama).

    Raises :class:`ConfigError` for another peft config type, a task type other than ``CAUSAL_LM``,
    a regex ``target_modules`` string, or any other LoRA option set away from peft's default
    (DoRA, rsLoRA, ``modules_to_save``, ``bias`` ...): preftune's LoRA does not apply those.
    """
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    if not isinstance(peft_config, LoraConfig):
        raise ConfigError(f"peft_config: only peft.LoraConfig is supported, got {type(peft_config).__name__}")
    task = getattr(peft_config.task_type, "value", peft_config.task_type)
    if task not in (None, "CAUSAL_LM"):
        raise ConfigError(f"peft_config: task_type {task!r}; preference training of a causal LM needs CAUSAL_LM")
    default = LoraConfig()
    odd = [f"{k}={getattr(peft_config, k)!r}" for k in vars(default)
           if k not in _LORA_HONOURED + _LORA_NO_EFFECT and getattr(peft_config, k) != getattr(default, k)]
    if peft_config.bias != "none":
        odd.append(f"bias={peft_config.bias!r}")
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
    elif isinstance(targets, str):
        if targets != "all-linear":
            raise ConfigError(f"peft_config: target_modules {targets!r}: a regex is not supported; give a list "
                              "of module names or 'all-linear'")
        targets = ["all-linear"]
    return PeftArguments(use_peft=True, lora_r=peft_config.r, lora_alpha=peft_config.lora_alpha,
                         lora_dropout=peft_config.lora_dropout, lora_target_modules=sorted(targets))


class _TRLTrainer(PreferenceTrainer):
    """The shared construction of the TRL-shaped trainers (see the module docstring)."""

    _config_class: ClassVar[type[_TRLConfig]]

    def _build(self, model, ref_model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
               peft_config, unsupported: dict[str, Any], legacy: dict[str, Any]) -> None:
        from transformers import set_seed

        from preftune.data import build_datasets
        from preftune.data.pipeline import records_to_raw
        from preftune.models import load_model, load_tokenizer, prepare_for_gradient_checkpointing
        from preftune.peft_utils import _is_peft_model, apply_peft
        from preftune.train import attach_reference, configure_cpu_numerics, trainer_kwargs

        name = type(self).__name__
        for key, value in unsupported.items():
            if value is not None:
                raise ConfigError(f"{name}: {key} is not supported: {_UNSUPPORTED_ARGS[key]}; drop the argument")
        if model is None:
            raise ConfigError(f"{name}: model is required (a name/path or a loaded PreTrainedModel)")
        if train_dataset is None:
            raise ConfigError(f"{name}: train_dataset is required")
        if args is None:
            base = model if isinstance(model, str) else getattr(model, "name_or_path", "") or "model"
            args = self._config_class(output_dir=f"{str(base).rstrip('/').split('/')[-1]}-{args_suffix(self)}")
        args, processing_class = self._apply_legacy(args, processing_class, legacy)
        set_seed(args.seed)
        loaded_by_name = isinstance(model, str)
        needs_reference = args.preftune_groups()[3].needs_reference

        # model and tokenizer
        init = dict(args.model_init_kwargs or {})
        if isinstance(model, str):
            unknown = sorted(set(init) - set(_MODEL_INIT_KEYS))
            if unknown:
                raise ConfigError(f"{name}: model_init_kwargs {unknown} not supported; use {', '.join(_MODEL_INIT_KEYS)}")
            dtype = init.get("dtype", init.get("torch_dtype", "float32"))
            model_args = ModelArguments(model_name_or_path=model, dtype=str(dtype).replace("torch.", ""),
                                        attn_implementation=init.get("attn_implementation", "sdpa"),
                                        trust_remote_code=bool(init.get("trust_remote_code", args.trust_remote_code)))
            model = load_model(model_args, training=True)
        else:
            if init:
                raise ConfigError(f"{name}: model_init_kwargs given but the model is already loaded")
            path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
            model_args = ModelArguments(model_name_or_path=path or None,
                                        dtype=str(getattr(model, "dtype", "float32")).replace("torch.", ""),
                                        attn_implementation=getattr(model.config, "_attn_implementation", None) or "sdpa")
            model.config.use_cache = False
        if processing_class is None:
            if not model_args.model_name_or_path:
                raise ConfigError(f"{name}: no processing_class and the model has no name_or_path to load one from")
            processing_class = load_tokenizer(model_args)
        elif processing_class.pad_token is None:
            if processing_class.eos_token is None:
                raise ConfigError(f"{name}: the tokenizer has neither a pad nor an eos token; add a pad token")
            processing_class.pad_token = processing_class.eos_token
            logger.info("tokenizer has no pad token; using the eos token %r", processing_class.eos_token)
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = processing_class.pad_token_id

        # reference-cache key: a model loaded here by name is keyed like the CLI's; an object by its weights
        amp = "bf16" if args.bf16 else "fp16" if args.fp16 else "none"
        object_key = None
        if needs_reference and not loaded_by_name and ref_model is None:
            object_key = f"object|{model_args.model_name_or_path}|{_fingerprint(model)}|amp={amp}"

        # LoRA
        continuing = _is_peft_model(model)
        if continuing:
            if peft_config is not None:
                raise ConfigError(f"{name}: the model already has peft adapters; pass peft_config=None, or the "
                                  "base model together with peft_config")
            cfg = model.peft_config[model.active_adapter]
            peft_args = PeftArguments(use_peft=True, lora_r=cfg.r, lora_alpha=cfg.lora_alpha,
                                      lora_dropout=cfg.lora_dropout, lora_target_modules=sorted(cfg.target_modules))
        elif peft_config is not None:
            peft_args = lora_to_peft_args(peft_config, model)
            model = apply_peft(model, peft_args)
        else:
            peft_args = PeftArguments()
        if args.gradient_checkpointing and peft_args.use_peft:
            prepare_for_gradient_checkpointing(model)
        if args.disable_dropout:
            _disable_dropout(model)
            peft_args.lora_dropout = 0.0  # what ran, for preftune_config.yaml

        groups = args.preftune_groups(model_args, peft_args)
        configure_cpu_numerics(groups[4])
        data = build_datasets(groups[2], processing_class, seed=args.seed,
                              train_raw=records_to_raw(train_dataset, "train_dataset"),
                              eval_raw=None if eval_dataset is None else records_to_raw(eval_dataset, "eval_dataset"))

        # reference policy (DPO family)
        live_ref = None
        if needs_reference:
            precompute = groups[4].precompute_ref_log_probs
            if ref_model is not None:
                ref_model = ref_model.to(args.device).eval().requires_grad_(False)
                if args.disable_dropout:
                    _disable_dropout(ref_model)
                object_key = f"object|{_fingerprint(ref_model)}|amp={amp}"
            elif continuing and not precompute:
                raise ConfigError(f"{name}: a PeftModel with precompute_ref_log_probs=False needs a ref_model "
                                  "(or keep precompute_ref_log_probs=True: the reference is the model as passed)")
            elif not peft_args.use_peft and not precompute:
                ref_model = copy.deepcopy(model).to(args.device).eval().requires_grad_(False)
            ref_ctx, live_ref = attach_reference(groups, model, data, ref_model=ref_model, model_key=object_key,
                                                 continuing=continuing,
                                                 batch_size=getattr(args, "precompute_ref_batch_size", None))
            if continuing:  # adapters-off is not this reference (the adapter as passed): no live fallback
                ref_ctx = None
        elif ref_model is not None:
            raise ConfigError(f"{name}: ref_model given, but {groups[3].loss} uses no reference model")
        else:
            ref_ctx = None

        kwargs = trainer_kwargs(groups, model, processing_class, data, ref_ctx, live_ref)
        super().__init__(**kwargs, callbacks=callbacks, optimizers=optimizers)
        self.preftune_groups = groups
        self.data_report = data.report

    def _apply_legacy(self, args, processing_class, legacy: dict[str, Any]):
        """Older spellings → today's (a copy of ``args``), logged in one line: trainer keywords, and a plain
        ``transformers.TrainingArguments`` as ``args`` (TRL < 0.9), whose fields are carried into the config."""
        from transformers import TrainingArguments

        name, config = type(self).__name__, self._config_class.__name__
        notes, fields = [], {}
        if not isinstance(args, self._config_class):
            if not isinstance(args, TrainingArguments) or isinstance(args, _TRLConfig):
                raise ConfigError(f"{name}: args must be a {config}, got {type(args).__name__}")
            args = self._config_class(**_training_fields(args), remove_unused_columns=False)
            notes.append(f"args=TrainingArguments(...) → args={config}(...)")
        if not legacy and not notes:
            return args, processing_class
        for key, value in legacy.items():
            if key == "tokenizer":
                if processing_class is not None:
                    raise ConfigError(f"{name}: give processing_class or tokenizer, not both")
                processing_class = value
                notes.append("tokenizer= → processing_class=")
                continue
            target = LEGACY_KEYWORDS.get(key)
            if target is None or not hasattr(args, target):
                valid = ["tokenizer", *[k for k, t in LEGACY_KEYWORDS.items() if hasattr(args, t)]]
                hint = difflib.get_close_matches(key, valid, n=1)
                raise TypeError(f"{name}.__init__() got an unexpected keyword argument {key!r}"
                                + (f"; did you mean {hint[0]!r}?" if hint else ""))
            fields[target] = value
            notes.append(f"{key}= → {config}({target}=)")
        if fields:
            args = copy.copy(args)
            for key, value in fields.items():
                setattr(args, key, value)
            args.preftune_groups()  # validate the new values
        logger.warning("%s: older TRL spelling; today's: %s", name, ", ".join(notes))
        return args, processing_class

    # ---- evaluation on another dataset --------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """``Trainer.evaluate``; an ``eval_dataset`` given here (a ``datasets.Dataset`` or a list of dicts in
        any supported format) is tokenised like the training data first. Its reference log-probs (DPO)
        come from the live reference: adapters-off for a fresh LoRA, or the ``ref_model``.

        Raises :class:`ConfigError` when that dataset needs reference log-probs and there is no live
        reference (full fine-tuning or a passed ``PeftModel`` with precomputed ones): give it at construction.
        """
        from preftune.trainer import PairDataset

        if eval_dataset is not None and not isinstance(eval_dataset, PairDataset):
            eval_dataset = PairDataset(self._tokenize(eval_dataset, "eval_dataset"))
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _tokenize(self, records, source: str):
        from preftune.data import build_datasets
        from preftune.data.pipeline import records_to_raw

        groups = self.preftune_groups
        if groups[3].needs_reference and self.ref_model is None and self.reference_context is None:
            raise ConfigError(f"{type(self).__name__}.evaluate({source}=...): the reference log-probs were "
                              "precomputed and no live reference exists (full fine-tuning or a passed PeftModel); "
                              "pass this dataset as eval_dataset when building the trainer")
        data = build_datasets(groups[2], self.processing_class, seed=self.args.seed,
                              train_raw=records_to_raw(records, source))
        return data.train

    # ---- saving -----------------------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` (adapter or model + tokenizer), plus — on a user's call — the resolved
        ``preftune_config.yaml`` and ``data_report.txt``."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if _internal_call or not self.is_world_process_zero():
            return
        from pathlib import Path

        out = Path(output_dir or self.args.output_dir)
        note = ("# written by preftune.trl; the data was passed in memory (train_dataset), so `dataset` below is\n"
                "# empty: set it to a file of the same records to repeat the run with `preftune train`\n")
        (out / "preftune_config.yaml").write_text(note + config_to_yaml(self.preftune_groups))
        (out / "data_report.txt").write_text(self.data_report + "\n")


def _training_fields(args) -> dict[str, Any]:
    """The ``transformers.TrainingArguments`` fields of ``args`` as keywords (the deprecated
    ``gradient_checkpointing*`` aliases left out: they mirror ``activation_checkpointing*``)."""
    import dataclasses

    from transformers import TrainingArguments

    skip = {"gradient_checkpointing", "gradient_checkpointing_kwargs", "remove_unused_columns"}
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments)
            if f.init and not f.name.startswith("_") and f.name not in skip}


def args_suffix(trainer: _TRLTrainer) -> str:
    """``CPO`` / ``DPO`` / ``ORPO``: TRL's default ``output_dir`` is ``<model name>-<suffix>``."""
    return trainer._config_class._trainer_name


class CPOTrainer(_TRLTrainer):
    """TRL 1.16's ``CPOTrainer`` signature on preftune (CPO, SimPO, CPO-SimPO; :class:`CPOConfig`)."""

    _config_class = CPOConfig

    def __init__(self, model=None, args: Optional[CPOConfig] = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, model_init=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, peft_config=None,
                 compute_metrics=None, **legacy):
        self._build(model, None, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                    peft_config, {"data_collator": data_collator, "model_init": model_init,
                                  "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
                                  "compute_metrics": compute_metrics}, legacy)


class ORPOTrainer(_TRLTrainer):
    """TRL 1.16's ``ORPOTrainer`` signature on preftune (:class:`ORPOConfig`)."""

    _config_class = ORPOConfig

    def __init__(self, model=None, args: Optional[ORPOConfig] = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, model_init=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, peft_config=None,
                 compute_metrics=None, **legacy):
        self._build(model, None, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                    peft_config, {"data_collator": data_collator, "model_init": model_init,
                                  "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
                                  "compute_metrics": compute_metrics}, legacy)


class DPOTrainer(_TRLTrainer):
    """TRL 1.16's ``DPOTrainer`` signature on preftune (:class:`DPOConfig`).

    ``ref_model``: None → the reference is the model as passed: adapters-off for a fresh LoRA
    (``peft_config``), the model itself for a ``PeftModel``, computed once before training with
    ``precompute_ref_log_probs`` (the default here) or, without it, live each step (adapters-off, or a
    frozen copy of a fully fine-tuned model). A model given → that model is the reference.
    """

    _config_class = DPOConfig

    def __init__(self, model=None, ref_model=None, args: Optional[DPOConfig] = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, **legacy):
        self._build(model, ref_model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                    peft_config, {"data_collator": data_collator, "compute_metrics": compute_metrics,
                                  "quantization_config": quantization_config}, legacy)
