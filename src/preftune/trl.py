"""A Python API with TRL's shape: ``from preftune.trl import DPOConfig, DPOTrainer`` instead of ``from trl``.

``CPOTrainer``, ``DPOTrainer``, ``ORPOTrainer`` and ``RewardTrainer`` take TRL 1.16's constructor (same
keywords, same positional order) and run preftune's recipe (:mod:`preftune.train`): the model (a
name/path or a loaded ``PreTrainedModel`` / ``PeftModel``), LoRA from a peft ``LoraConfig``, the data
through :mod:`preftune.data` (a ``datasets.Dataset`` or a list of dicts in any supported format),
reference log-probs, and a :class:`preftune.trainer.PreferenceTrainer` — a ``transformers.Trainer``,
so ``.train()``, ``.evaluate()``, ``.save_model()``, ``.state.log_history`` and callbacks are the
usual ones. The configs are in :mod:`preftune.trl_config`; the field mapping is in ``docs/python-api.md``.

Older TRL spellings still work, with one logged line naming today's: ``tokenizer=`` (now
``processing_class=``), the loss/data settings that used to go to the trainer (``beta=``,
``max_length=``, ``max_prompt_length=``, ``max_target_length=`` ...; now fields of the config), and a
plain ``transformers.TrainingArguments`` as ``args`` (TRL < 0.9).

Unlike ``preftune train``, a non-empty ``output_dir`` is not refused (TRL's behaviour: scripts rerun).
"""

from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any, ClassVar, Optional

from preftune import trl_support as support
from preftune.cli_args import config_to_yaml
from preftune.config import ConfigError, PeftArguments, resolve_reference_options
from preftune.trainer import PairDataset, PreferenceTrainer
from preftune.trl_config import CPOConfig, DPOConfig, ORPOConfig, RewardConfig, _TRLConfig

__all__ = ["CPOConfig", "CPOTrainer", "DPOConfig", "DPOTrainer", "ORPOConfig", "ORPOTrainer", "RewardConfig",
           "RewardTrainer"]

logger = logging.getLogger("preftune.trl")


class _TRLTrainer(PreferenceTrainer):
    """The shared construction of the TRL-shaped trainers (see the module docstring).

    After construction: ``preftune_groups`` (the configuration groups, as ``preftune train`` resolves
    them) and ``data_report`` (the data lines: format, counts, truncations).
    """

    _config_class: ClassVar[type[_TRLConfig]]

    def _build(self, model, ref_model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
               peft_config, unsupported: dict[str, Any], legacy: dict[str, Any]) -> None:
        from transformers import set_seed

        from preftune.data import build_datasets
        from preftune.data.pipeline import check_preference_signal, records_to_raw
        from preftune.engine.kinds import kind_for
        from preftune.models import prepare_for_gradient_checkpointing
        from preftune.peft_utils import _is_peft_model, apply_peft
        from preftune.train import configure_cpu_numerics, quiet_replicas, trainer_kwargs

        name = type(self).__name__
        for key, value in unsupported.items():
            if value is not None:
                raise ConfigError(f"{name}: {key} is not supported: {support.UNSUPPORTED_ARGS[key]}; drop the argument")
        if model is None or train_dataset is None:
            raise ConfigError(f"{name}: model and train_dataset are required")
        if args is None:  # TRL's default output_dir: <model name>-<trainer>
            base = model if isinstance(model, str) else getattr(model, "name_or_path", "") or "model"
            args = self._config_class(output_dir=f"{str(base).rstrip('/').split('/')[-1]}-"
                                                 f"{self._config_class._trainer_name}")
        args, processing_class = self._apply_legacy(args, processing_class, legacy)
        quiet_replicas()
        set_seed(args.seed)
        loss_args = args.preftune_groups()[3]
        reward = loss_args.is_reward_model

        model, model_args = support.resolve_model(model, args, reward=reward, where=name)
        kind_for(model).head(model)  # an architecture no engine kind supports: one clear error, before the data
        processing_class = support.ready_tokenizer(processing_class, model_args, name)
        if reward:
            model.config.pad_token_id = processing_class.pad_token_id  # the reward is read at the last non-pad
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = processing_class.pad_token_id
        # reference-cache key: a model loaded here by name is keyed as the CLI keys it; an object by its weights
        amp = "bf16" if args.bf16 else "fp16" if args.fp16 else "none"
        object_key = None
        if loss_args.needs_reference and ref_model is None and not isinstance(self._given_model, str):
            object_key = f"object|{model_args.model_name_or_path}|{support.fingerprint(model)}|amp={amp}"

        continuing = _is_peft_model(model)  # a PeftModel passed: its adapter trains on, from as it is
        if continuing and peft_config is not None:
            raise ConfigError(f"{name}: the model already has peft adapters; pass peft_config=None, or the base "
                              "model together with peft_config")
        if continuing:
            peft_args = support.peft_args_of(model)
        elif peft_config is not None:
            peft_args = support.lora_to_peft_args(peft_config, model, reward=reward)
            if args.disable_dropout:
                peft_args.lora_dropout = 0.0  # TRL zeroes LoRA's dropout too; the YAML then says what ran
            model = apply_peft(model, peft_args, reward_head=reward)
        else:
            peft_args = PeftArguments()
        if args.gradient_checkpointing and peft_args.use_peft:
            prepare_for_gradient_checkpointing(model)
        if args.disable_dropout:
            support.disable_dropout(model)
            peft_args.lora_dropout = 0.0

        groups = args.preftune_groups(model_args, peft_args)
        resolve_reference_options(groups[3], groups[4], has_ref_model=ref_model is not None)
        configure_cpu_numerics(groups[4])
        data = build_datasets(groups[2], processing_class, seed=args.seed,
                              train_raw=records_to_raw(train_dataset, "train_dataset"),
                              eval_raw=None if eval_dataset is None else records_to_raw(eval_dataset, "eval_dataset"))
        check_preference_signal(data.train, groups[3].loss)  # every pair identical: DataError; some: a warning
        if reward:  # identical pairs skipped and counted
            from preftune.score import prepare_reward_data

            data = prepare_reward_data(data)
        ref_ctx, live_ref = self._reference(groups, model, data, ref_model, object_key, continuing, amp)
        run_config = config_to_yaml(groups)  # before the Trainer (it builds a TrainingArguments)
        super().__init__(**trainer_kwargs(groups, model, processing_class, data, ref_ctx, live_ref),
                         callbacks=callbacks, optimizers=optimizers)
        self.run_config_yaml = run_config  # written into every checkpoint, as preftune train does
        self.preftune_groups = groups
        self.data_report = data.report

    _given_model: Any = None

    def _reference(self, groups, model, data, ref_model, object_key, continuing, amp):
        """``(reference_context, live_ref_model)`` for the DPO family (see :func:`preftune.train.attach_reference`)."""
        from preftune.train import attach_reference

        args, name = groups[5], type(self).__name__
        if not groups[3].needs_reference:
            if ref_model is not None:
                raise ConfigError(f"{name}: ref_model given, but {groups[3].loss} uses no reference model")
            return None, None
        precompute = groups[4].precompute_ref_log_probs
        if ref_model is not None:
            ref_model = ref_model.to(args.device).eval().requires_grad_(False)
            if args.disable_dropout:
                support.disable_dropout(ref_model)
            object_key = f"object|{support.fingerprint(ref_model)}|amp={amp}"
        elif continuing and not precompute:
            raise ConfigError(f"{name}: a PeftModel with precompute_ref_log_probs=False needs a ref_model "
                              "(or keep precompute_ref_log_probs=True: the reference is the model as passed)")
        elif not groups[1].use_peft and not precompute:  # full fine-tuning, live reference: a frozen copy
            ref_model = copy.deepcopy(model).to(args.device).eval().requires_grad_(False)
        ref_ctx, live_ref = attach_reference(groups, model, data, ref_model=ref_model, model_key=object_key,
                                             continuing=continuing,
                                             batch_size=getattr(args, "precompute_ref_batch_size", None))
        if continuing:  # adapters-off is not this reference (the adapter as passed): no live fallback
            ref_ctx = None
        return ref_ctx, live_ref

    def _apply_legacy(self, args, processing_class, legacy: dict[str, Any]):
        """Older spellings → today's (a copy of ``args``), logged in one line: trainer keywords, and a plain
        ``transformers.TrainingArguments`` as ``args`` (TRL < 0.9), whose fields are carried into the config."""
        from transformers import TrainingArguments

        name, config = type(self).__name__, self._config_class.__name__
        notes, fields = [], {}
        if not isinstance(args, self._config_class):
            if not isinstance(args, TrainingArguments) or isinstance(args, _TRLConfig):
                raise ConfigError(f"{name}: args must be a {config}, got {type(args).__name__}")
            args = self._config_class(**support.training_fields(args), remove_unused_columns=False)
            notes.append(f"args=TrainingArguments(...) → args={config}(...)")
        for key, value in legacy.items():
            if key == "tokenizer":
                if processing_class is not None:
                    raise ConfigError(f"{name}: give processing_class or tokenizer, not both")
                processing_class = value
                notes.append("tokenizer= → processing_class=")
                continue
            target = support.LEGACY_KEYWORDS.get(key)
            if target is None or not hasattr(args, target):
                valid = ["tokenizer", *[k for k, t in support.LEGACY_KEYWORDS.items() if hasattr(args, t)]]
                hint = difflib.get_close_matches(key, valid, n=1)
                raise TypeError(f"{name}.__init__() got an unexpected keyword argument {key!r}"
                                + (f"; did you mean {hint[0]!r}?" if hint else ""))
            fields[target] = value
            notes.append(f"{key}= → {config}({target}=)")
        if not notes:
            return args, processing_class
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
        if groups[3].is_reward_model:
            from preftune.score import prepare_reward_data

            data = prepare_reward_data(data)
        return data.train

    # ---- saving -----------------------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` (adapter or model + tokenizer), plus — on a user's call — the resolved
        ``preftune_config.yaml``, ``data_report.txt`` and, for a reward model, ``value_head.safetensors``."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if _internal_call or not self.is_world_process_zero():
            return
        out = Path(output_dir or self.args.output_dir)
        note = ("# written by preftune.trl; the data was passed in memory (train_dataset), so `dataset` below is\n"
                "# empty: set it to a file of the same records to repeat the run with `preftune train`\n")
        (out / "preftune_config.yaml").write_text(note + self.run_config_yaml)
        (out / "data_report.txt").write_text(self.data_report + "\n")
        if self.preftune_groups[3].is_reward_model:
            from preftune.score import save_value_head

            save_value_head(self.model, out)


def _unsupported(**kwargs: Any) -> dict[str, Any]:
    return kwargs


class CPOTrainer(_TRLTrainer):
    """TRL 1.16's ``CPOTrainer`` signature on preftune (CPO, SimPO, CPO-SimPO; :class:`CPOConfig`)."""

    _config_class = CPOConfig

    def __init__(self, model=None, args: Optional[CPOConfig] = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, model_init=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, peft_config=None,
                 compute_metrics=None, **legacy):
        self._given_model = model
        self._build(model, None, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                    peft_config, _unsupported(data_collator=data_collator, model_init=model_init,
                                              preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                                              compute_metrics=compute_metrics), legacy)


class ORPOTrainer(_TRLTrainer):
    """TRL 1.16's ``ORPOTrainer`` signature on preftune (:class:`ORPOConfig`)."""

    _config_class = ORPOConfig

    def __init__(self, model=None, args: Optional[ORPOConfig] = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, model_init=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, peft_config=None,
                 compute_metrics=None, **legacy):
        self._given_model = model
        self._build(model, None, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                    peft_config, _unsupported(data_collator=data_collator, model_init=model_init,
                                              preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                                              compute_metrics=compute_metrics), legacy)


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
        self._given_model = model
        self._build(model, ref_model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                    peft_config, _unsupported(data_collator=data_collator, compute_metrics=compute_metrics,
                                              quantization_config=quantization_config), legacy)


class RewardTrainer(_TRLTrainer):
    """TRL 1.16's ``RewardTrainer`` signature on preftune's reward model (``--loss rm``; :class:`RewardConfig`).

    ``model``: a name/path (loaded as a sequence classifier with one label, the scalar head ``score``
    new and seeded) or a loaded one-label sequence classifier. With a ``LoraConfig`` (task ``SEQ_CLS``)
    LoRA adapts the body and the head trains fully; ``save_model`` also writes ``value_head.safetensors``.
    """

    _config_class = RewardConfig

    def __init__(self, model=None, args: Optional[RewardConfig] = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None,
                 quantization_config=None, peft_config=None, **legacy):
        self._given_model = model
        self._build(model, None, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                    peft_config, _unsupported(data_collator=data_collator, compute_metrics=compute_metrics,
                                              optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                                              preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                                              quantization_config=quantization_config), legacy)
