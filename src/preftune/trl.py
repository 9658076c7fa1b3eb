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
from preftune.config import ConfigError, PeftArguments, RunConfig
from preftune.modeling import is_peft_model
from preftune.run_setup import amp_name, model_identity, prepare_run
from preftune.trainer import PairDataset, PreferenceTrainer
from preftune.trl_config import CPOConfig, DPOConfig, KTOConfig, ORPOConfig, RewardConfig, _TRLConfig
from preftune.trl_eval import DPORow, EncodedRow, RewardRow, TRLEvalMixin, TRLRow, as_rows

__all__ = ["CPOConfig", "CPOTrainer", "DPOConfig", "DPOTrainer", "KTOConfig", "KTOTrainer", "ORPOConfig", "ORPOTrainer",
           "RewardConfig", "RewardTrainer"]

logger = logging.getLogger("preftune.trl")


class _TRLTrainer(TRLEvalMixin, PreferenceTrainer):
    """The shared construction of the TRL-shaped trainers (see the module docstring).

    After construction: ``preftune_groups`` (the :class:`~preftune.config.RunConfig`, as ``preftune train``
    resolves it) and ``data_report`` (the data lines: format, counts, truncations).
    """

    _config_class: ClassVar[type[_TRLConfig]]
    # TRL's DPOTrainer adds the MoE router loss whenever the model's config declares output_router_logits
    # (Qwen3-MoE ships it False); its CPO / ORPO trainers, as preftune's default, only when it is True
    _router_loss_when_declared: ClassVar[bool] = False
    # TRL's model tags (model.add_model_tags; default ["trl", <config's trainer name, lower case>]) and the
    # class of the tokenised rows (TRL's columns by key: preftune.trl_eval.TRLRow; None: plain pairs)
    _tag_names: ClassVar[Optional[list[str]]] = None
    _row_class: ClassVar[Optional[type[TRLRow]]] = None

    def _build(self, model, ref_model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
               peft_config, unsupported: dict[str, Any], legacy: dict[str, Any]) -> None:
        """Translate TRL's arguments into a :class:`~preftune.config.RunConfig` (+ the objects the script
        passed), run the one setup (:func:`preftune.run_setup.prepare_run`, as ``preftune train`` does),
        then build the trainer."""
        from transformers import set_seed

        from preftune.data.pipeline import records_to_raw
        from preftune.models import apply_peft, ready_tokenizer

        name = type(self).__name__
        compute_metrics = unsupported.pop("compute_metrics", None)  # on the per-pair rewards (trl_eval)
        quantization_config = unsupported.pop("quantization_config", None)  # from_pretrained's, as in TRL
        for key, value in unsupported.items():
            if value is not None:
                raise ConfigError(f"{name}: {key} is not supported: {support.UNSUPPORTED_ARGS[key]}; drop the argument")
        for key, value in (("model", model), ("train_dataset", train_dataset)):
            if value is None:  # TRL's words
                raise ConfigError(f"{name}: `{key}` is required")
        if args is None:  # TRL's default output_dir: <model name>-<trainer>
            base = model if isinstance(model, str) else getattr(model, "name_or_path", "") or "model"
            args = self._config_class(output_dir=f"{str(base).rstrip('/').split('/')[-1]}-"
                                                 f"{self._config_class._trainer_name}")
        args, processing_class = self._apply_legacy(args, processing_class, legacy)
        set_seed(args.seed)  # before a model given by name is loaded: a new reward head or LoRA is seeded
        loss_args = args.preftune_groups().loss
        reward = loss_args.spec.consumes == "rewards"
        given = model
        self._init_extras = support.model_init_extras(support.model_init(args, quantization_config, name))
        model, model_args = support.resolve_model(model, support.model_init(args, quantization_config, name), args,
                                                  reward=reward, where=name)
        processing_class = ready_tokenizer(processing_class, model_args, where=name)
        support.apply_chat_template_path(processing_class, getattr(args, "chat_template_path", None), name)

        continuing = is_peft_model(model)  # a PeftModel passed: its adapter trains on, from as it is
        if continuing and peft_config is not None:
            raise ConfigError(f"{name}: the model already has peft adapters; pass peft_config=None, or the base "
                              "model together with peft_config")
        if continuing:
            peft_args = support.peft_args_of(model)
        elif peft_config is not None:
            peft_args = support.lora_to_peft_args(peft_config, model, reward=reward)
            if args.disable_dropout:
                peft_args.lora_dropout = 0.0  # TRL zeroes LoRA's dropout too; the YAML then says what ran
            model = apply_peft(model, peft_args, **support.lora_choices(peft_config, reward=reward))
        else:
            peft_args = PeftArguments()
        if args.disable_dropout:
            support.disable_dropout(model)
            peft_args.lora_dropout = 0.0
        config = args.preftune_groups(model_args, peft_args)
        if self._router_loss_when_declared and config.loss.router_aux_loss_coef is None:
            config.loss.router_aux_loss_coef = support.declared_router_aux_coef(model)
        ref_model, ref_key = self._reference(config, model, given, ref_model, continuing)
        if isinstance(eval_dataset, dict):  # several eval sets (a dict or a DatasetDict): one evaluation each
            eval_raw = {name: records_to_raw(records, f"eval_dataset[{name!r}]") for name, records in eval_dataset.items()}
        else:
            eval_raw = None if eval_dataset is None else records_to_raw(eval_dataset, "eval_dataset")
        prepared = prepare_run(config, model=model, tokenizer=processing_class,
                               train_raw=records_to_raw(train_dataset, "train_dataset"), eval_raw=eval_raw,
                               ref_model=ref_model, ref_key=ref_key, continuing=continuing)
        kwargs = prepared.trainer_kwargs()
        as_rows(kwargs["train_dataset"], self._row_class)
        as_rows(kwargs["eval_dataset"], self._row_class)
        if isinstance(kwargs["eval_dataset"], dict):
            kwargs["eval_dataset"] = {name: PairDataset(pairs) for name, pairs in kwargs["eval_dataset"].items()}
        super().__init__(**kwargs, callbacks=callbacks, optimizers=optimizers, compute_metrics=compute_metrics)
        self.run_config_yaml = prepared.config_yaml  # written into every checkpoint, as preftune train does
        self.preftune_groups = config
        self.data_report = prepared.data.report
        support.add_model_tags(self.model, self._tag_names or ["trl", self._config_class._trainer_name.lower()])
        if continuing and ref_model is None and config.loss.needs_reference and config.engine.precompute_ref_log_probs:
            self.keep_starting_adapter()  # the reference of new eval data after training (trl_eval)

    def _reference(self, config: RunConfig, model, given, ref_model, continuing: bool):
        """TRL's reference rules as preftune's: ``(ref_model, reference-cache key)``.

        A ``ref_model`` given is that reference (dropout off when ``disable_dropout``), keyed by its
        weights; a fully fine-tuned model with a live reference gets a frozen copy of itself; a model
        passed as an object is keyed by its weights (a model loaded here by name as the CLI keys it).

        Raises :class:`ConfigError`: a ``ref_model`` for a loss without a reference, or a ``PeftModel``
        with ``precompute_ref_log_probs=False`` and no ``ref_model``.
        """
        name, args = type(self).__name__, config.training
        amp = amp_name(args)
        if not config.loss.needs_reference:
            if ref_model is not None:
                raise ConfigError(f"{name}: ref_model given, but {config.loss.loss} uses no reference model")
            return None, None
        precompute = config.engine.precompute_ref_log_probs
        if ref_model is not None:
            if args.disable_dropout:
                support.disable_dropout(ref_model)
            return ref_model, f"object|{support.fingerprint(ref_model)}|amp={amp}"
        if continuing and not precompute:
            raise ConfigError(f"{name}: a PeftModel with precompute_ref_log_probs=False needs a ref_model "
                              "(or keep precompute_ref_log_probs=True: the reference is the model as passed)")
        if isinstance(given, str):  # as the CLI keys it; from_pretrained's other keywords (revision ...) added
            key = None if not self._init_extras else \
                f"{model_identity(config.model, config.peft, amp)}|init={sorted(map(repr, self._init_extras.items()))}"
        else:
            key = f"object|{config.model.model_name_or_path}|{support.fingerprint(model)}|amp={amp}"
        if not config.peft.use_peft and not precompute:  # full fine-tuning, live reference: a frozen copy
            return copy.deepcopy(model), key
        return None, key

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
        from preftune.engine.kinds import kind_for

        kind_for(self.model).save_extras(self.model, out)  # a reward model's value_head.safetensors


def _unsupported(**kwargs: Any) -> dict[str, Any]:
    return kwargs


class _PolicyTrainer(_TRLTrainer):
    """TRL 1.16's constructor of the trainers without a reference model (CPO and ORPO share it)."""

    def __init__(self, model=None, args: Optional[_TRLConfig] = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, model_init=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, peft_config=None,
                 compute_metrics=None, **legacy):
        self._build(model, None, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                    peft_config, _unsupported(data_collator=data_collator, model_init=model_init,
                                              preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                                              compute_metrics=compute_metrics), legacy)


class CPOTrainer(_PolicyTrainer):
    """TRL 1.16's ``CPOTrainer`` signature on preftune (CPO, SimPO, CPO-SimPO; :class:`CPOConfig`)."""

    _config_class = CPOConfig
    _row_class = EncodedRow


class ORPOTrainer(_PolicyTrainer):
    """TRL 1.16's ``ORPOTrainer`` signature on preftune (:class:`ORPOConfig`)."""

    _config_class = ORPOConfig
    _row_class = EncodedRow


class DPOTrainer(_TRLTrainer):
    """TRL 1.16's ``DPOTrainer`` signature on preftune (:class:`DPOConfig`).

    ``ref_model``: None → the reference is the model as passed: adapters-off for a fresh LoRA
    (``peft_config``), the model itself for a ``PeftModel``, computed once before training with
    ``precompute_ref_log_probs`` (the default here) or, without it, live each step (adapters-off, or a
    frozen copy of a fully fine-tuned model). A model given → that model is the reference, kept as
    ``trainer.ref_model`` as in TRL (with precomputed log-probs it also scores ``evaluate(eval_dataset=...)``).
    """

    _config_class = DPOConfig
    _row_class = DPORow
    _router_loss_when_declared = True

    def __init__(self, model=None, ref_model=None, args: Optional[DPOConfig] = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, **legacy):
        self._build(model, ref_model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                    peft_config, _unsupported(data_collator=data_collator, compute_metrics=compute_metrics,
                                              quantization_config=quantization_config), legacy)


class RewardTrainer(_TRLTrainer):
    """TRL 1.16's ``RewardTrainer`` signature on preftune's reward model (``--loss rm``; :class:`RewardConfig`).

    ``model``: a name/path (loaded as a sequence classifier with one label, the scalar head ``score``
    new and seeded) or a loaded one-label sequence classifier. With a ``LoraConfig`` peft decides what trains,
    as under TRL: task ``SEQ_CLS`` also trains a copy of the head, ``LoraConfig()`` the adapters only;
    ``save_model`` also writes ``value_head.safetensors``.
    """

    _config_class = RewardConfig
    _tag_names = ["trl", "reward-trainer"]
    _row_class = RewardRow

    def __init__(self, model=None, args: Optional[RewardConfig] = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None,
                 quantization_config=None, peft_config=None, **legacy):
        self._build(model, None, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                    peft_config, _unsupported(data_collator=data_collator, compute_metrics=compute_metrics,
                                              optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                                              preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                                              quantization_config=quantization_config), legacy)


class KTOTrainer(_TRLTrainer):
    """TRL 1.16's ``KTOTrainer`` signature on preftune's KTO (:class:`KTOConfig`; ``loss_type`` ``kto`` or
    ``apo_zero_unpaired``).

    ``train_dataset``: unpaired records (``prompt`` / ``completion`` / ``label``, standard or conversational,
    or ms-swift / LLaMA-Factory ``messages`` + ``label``) or preference pairs, unpaired as TRL does
    (:mod:`preftune.data.unpaired`). The reference is as for :class:`DPOTrainer`.
    """

    _config_class = KTOConfig
    _router_loss_when_declared = True

    def __init__(self, model=None, ref_model=None, args: Optional[KTOConfig] = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, **legacy):
        self._build(model, ref_model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                    peft_config, _unsupported(data_collator=data_collator, compute_metrics=compute_metrics,
                                              quantization_config=quantization_config), legacy)
