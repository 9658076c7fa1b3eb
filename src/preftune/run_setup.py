"""One setup for both doors: the CLI (:mod:`preftune.train`) and the TRL-shaped API (:mod:`preftune.trl`).

:func:`prepare_run` takes a :class:`~preftune.config.RunConfig` (and, from the TRL door, what a TRL
script passes as objects: a loaded model, a tokenizer, records in memory, a reference model) and
does, in this order, everything a run needs before its trainer exists:

1. processes and numerics: replicas log warnings only, the seed (before the model is loaded, so a
   new reward head or LoRA is seeded), the device's numerics (:class:`preftune.device.DevicePolicy`:
   TF32 on CUDA, denormals flushed on the CPU);
2. the model and tokenizer (loaded here unless given; the loss table says whether the model is a
   policy or a reward model), the model kind's checks and set-up (``kind_for(model).ready``);
3. the data: loaded, validated, split, tokenised as the model kind wants (``tokenize_options``),
   checked for a preference signal, then the kind's own preparation (``prepare_data``);
4. the reference policy of losses that need one (:func:`attach_reference`), computed on the training
   device (the model is placed there first where the Trainer would place it);
5. the resolved configuration as YAML (written into every checkpoint).

The result, :class:`PreparedRun`, gives the keyword arguments of
:class:`preftune.trainer.PreferenceTrainer`; each door builds its trainer from them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from preftune.cli_args import config_to_yaml
from preftune.config import ModelArguments, PeftArguments, RunConfig, resolve_reference_options
from preftune.device import DevicePolicy
from preftune.distributed import is_main_process

logger = logging.getLogger("preftune.train")


@dataclass
class PreparedRun:
    """Everything a trainer is built from (see :func:`prepare_run`).

    ``ref_ctx``: zero-argument callable returning the context under which ``model`` computes the
    reference policy (adapters off, or the frozen starting adapter), or None; ``ref_model``: a
    separate frozen reference model, or None; ``config_yaml``: the resolved configuration.
    """

    config: RunConfig
    model: Any
    tokenizer: Any
    data: Any
    ref_ctx: Any
    ref_model: Any
    config_yaml: str

    def trainer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`preftune.trainer.PreferenceTrainer`."""
        c = self.config
        return dict(model=self.model, args=c.training, train_dataset=self.data.train, eval_dataset=self.data.eval,
                    processing_class=self.tokenizer, loss_args=c.loss, engine_args=c.engine,
                    reference_context=self.ref_ctx, ref_model=self.ref_model, pad_token_id=pad_token_id(self.tokenizer))


def pad_token_id(tokenizer) -> int:
    """The pad id of a tokenizer or of a processor's tokenizer (0 when it has none)."""
    return getattr(tokenizer, "tokenizer", tokenizer).pad_token_id or 0


def prepare_run(config: RunConfig, *, model=None, tokenizer=None, train_raw=None, eval_raw=None, ref_model=None,
                ref_key: Optional[str] = None, continuing: Optional[bool] = None) -> PreparedRun:
    """The one setup of a training run (see the module docstring).

    Args:
        config: the configuration groups.
        model: a loaded model (``PreTrainedModel`` or ``PeftModel``, LoRA already applied) or None:
            loaded from ``config.model`` / ``config.peft``; the caller seeds before loading its own.
        tokenizer: the tokenizer (or processor) of a given model; loaded with the model otherwise.
        train_raw, eval_raw: records in memory (:func:`preftune.data.pipeline.records_to_raw`)
            instead of ``--dataset`` / ``--eval_file``; ``eval_raw`` may be a dict of several eval sets
            (name → records), each tokenised as the training data (``data.eval`` is then that dict of
            pair lists: the Trainer evaluates each with the prefix ``eval_<name>_``).
        ref_model: a frozen reference model given by the caller; ``ref_key``: its reference-cache key
            (default :func:`model_identity`).
        continuing: the model's adapter trains on from a starting state that is the reference
            (default: ``--peft_model_id`` is set).

    Raises:
        preftune.errors.ConfigError, DataError, ModelLoadError: as the stages raise them.
    """
    from transformers import set_seed

    from preftune.data import build_datasets
    from preftune.data.pipeline import check_preference_signal
    from preftune.engine.forward import configure_for_loss
    from preftune.engine.kinds import kind_for

    quiet_replicas()
    training = config.training
    resolve_reference_options(config.loss, config.engine, has_ref_model=ref_model is not None)
    if model is None:
        set_seed(training.seed)
    policy = DevicePolicy.of(training.device)
    policy.configure_numerics(config.engine.flush_denormal)
    if continuing is None:
        continuing = bool(config.peft.peft_model_id)
    if model is None:
        from preftune.models import check_sharding

        check_sharding(config.peft, training)  # QLoRA with FSDP / ZeRO-3: one line, before loading
        model, tokenizer = _load(config)
    kind = kind_for(model)
    kind.head(model)  # an architecture no kind supports: one clear error before any data is tokenised
    kind.ready(model, tokenizer)
    if getattr(training, "gradient_checkpointing", False) and config.peft.use_peft:
        from preftune.models import prepare_for_gradient_checkpointing

        prepare_for_gradient_checkpointing(model)
    with training.main_process_first(desc="loading the data"):  # Hub datasets downloaded once
        sets = eval_raw if isinstance(eval_raw, dict) else None
        data = build_datasets(config.data, tokenizer, seed=training.seed, train_raw=train_raw,
                              eval_raw=None if sets is not None else eval_raw, **kind.tokenize_options(model))
    check_preference_signal(data.train, config.loss.loss)  # every pair identical: DataError; some: a warning
    data = kind.prepare_data(data)
    if sets is not None:
        data.eval, lines = tokenize_eval_sets(config, model, tokenizer, sets)
        data.report = "\n".join([data.report, *lines])
    if config.loss.spec.consumes == "unpaired_logps":  # KTO: unpaired examples with their KL partners
        from preftune.data.unpaired import prepare_kto

        prepare_kto(data, kl=config.loss.loss == "kto", batch_size=training.per_device_train_batch_size,
                    max_length=config.data.max_length, desirable_weight=config.loss.desirable_weight,
                    undesirable_weight=config.loss.undesirable_weight)
    if config.loss.needs_reference:
        place_on_device(model, training, policy)
    configure_for_loss(config.loss, model, ref_model)  # LD-DPO / WPO sums, before any reference is computed
    ref_ctx, live_ref = attach_reference(config, model, data, ref_model=ref_model, model_key=ref_key,
                                         continuing=continuing)
    # (before the trainer: config_to_yaml builds a TrainingArguments, which resets accelerate's state)
    return PreparedRun(config, model, tokenizer, data, ref_ctx, live_ref, config_to_yaml(config))


def tokenize_eval_sets(config: RunConfig, model, tokenizer, sets: dict) -> tuple[dict, list[str]]:
    """Eval sets given as records (name → :class:`~preftune.data.loading.RawData`), each tokenised and
    prepared as the training data: ``({name: pairs}, report lines)`` (lines ``eval data (<name>): ...``).
    Raises :class:`DataError` as the data pipeline does (every pair of a set dropped included)."""
    import dataclasses

    from preftune.data import build_datasets
    from preftune.engine.kinds import kind_for

    kind = kind_for(model)
    data_args = dataclasses.replace(config.data, eval_file=None, eval_ratio=0.0)
    out, lines = {}, []
    for name, raw in sets.items():
        data = kind.prepare_data(build_datasets(data_args, tokenizer, seed=config.training.seed, train_raw=raw,
                                                **kind.tokenize_options(model)))
        out[name] = data.train
        lines += [line.replace("data: ", f"eval data ({name}): ", 1) for line in data.report.splitlines()]
    return out, lines


def _load(config: RunConfig):
    """Model + tokenizer from the configuration; the loss table says policy or reward model."""
    from preftune.models import load_model_and_tokenizer

    # continuing an adapter: its starting state is the DPO reference, kept as a frozen second adapter
    # (only needed when the reference is computed during training, not when precomputed once)
    live_reference = config.loss.needs_reference and not config.engine.precompute_ref_log_probs
    with _main_first_unless_collective(config.training, "loading the model"):  # GGUF conversion, downloads: once
        return load_model_and_tokenizer(config.model, config.peft,
                                        with_reference_adapter=bool(config.peft.peft_model_id) and live_reference,
                                        reward_model=config.loss.spec.consumes == "rewards")


def attach_reference(config: RunConfig, model, data, *, ref_model=None, model_key: Optional[str] = None,
                     continuing: bool = False, batch_size: Optional[int] = None):
    """The reference policy of the DPO family: ``(reference_context, live_ref_model)``; ``(None, None)``
    for losses without one.

    With ``--precompute_ref_log_probs`` the reference log-probs are computed here, before any update,
    and stored on the pairs of ``data`` (cached on disk under ``model_key``, default
    :func:`model_identity`): by ``ref_model`` when given, else by the model as loaded — a continued
    adapter as it is (``continuing``), or, for a fresh LoRA, the base model, which adapters-off computes
    exactly; a given ``ref_model`` is still returned (the trainer keeps it as TRL does: the precomputed
    log-probs serve training, it serves ``evaluate`` on data given later). Without it the reference
    runs live in each step: ``ref_model`` when given (moved to the
    training device), adapters-off (LoRA; for a continued adapter only its frozen starting copy), or a
    second frozen copy loaded from ``config.model`` on the training device.
    ``batch_size``: pairs per precompute batch (default ``precompute_ref_batch_size`` of a TRL config,
    else ``per_device_eval_batch_size``).
    """
    from preftune.engine.reference import attach_reference_logps
    from preftune.models import REFERENCE_ADAPTER, load_reference_model, reference_context

    training = config.training
    if not config.loss.needs_reference:
        return None, None
    if ref_model is not None:
        ref_model = ref_model.to(training.device).eval().requires_grad_(False)
    ref_ctx = None
    starting_copy = REFERENCE_ADAPTER in (getattr(model, "peft_config", None) or {})
    if config.peft.use_peft and ref_model is None and (not continuing or starting_copy):
        ref_ctx = functools.partial(reference_context, model)
    if config.engine.precompute_ref_log_probs:
        reference = model if ref_model is None else ref_model
        batch_size = batch_size or getattr(training, "precompute_ref_batch_size", None) \
            or training.per_device_eval_batch_size
        with mixed_precision(reference, training):  # same numerics as the training forward
            key = model_key or model_identity(config.model, config.peft, amp_name(training))
            evaluation = data.eval or []
            if isinstance(evaluation, dict):  # several eval sets
                evaluation = [pair for pairs in evaluation.values() for pair in pairs]
            attach_reference_logps(reference, data.train + evaluation, model_key=key,
                                   reference_context=None if continuing or ref_model is not None else ref_ctx,
                                   batch_size=batch_size, chunk_size=config.engine.logprob_chunk_size)
        return ref_ctx, ref_model  # a given ref_model is kept (as TRL keeps it): it scores new eval data
    if ref_model is None and not config.peft.use_peft:
        ref_model = load_reference_model(config.model).to(training.device)
    return (None, ref_model) if ref_model is not None else (ref_ctx, None)


def place_on_device(model, training, policy: DevicePolicy) -> bool:
    """Move ``model`` to the training device now (before reference log-probs are computed) where the
    Trainer would move it later anyway: on a GPU, without DeepSpeed / FSDP (they place the weights
    themselves), a device map (model parallel) or bitsandbytes weights (placed when loaded). Returns
    whether it moved."""
    if not policy.is_cuda or training.deepspeed or training.fsdp or getattr(model, "hf_device_map", None) \
            or getattr(model, "quantization_method", None) is not None:
        return False
    model.to(policy.device)
    return True


def model_identity(model_args: ModelArguments, peft_args: PeftArguments, amp: str = "none") -> str:
    """A string that identifies the reference policy for the reference-log-prob cache: model source
    (+ weight files' sizes and times), adapter, dtype, attention kernel, mixed precision ``amp``."""
    from preftune.models import quantization_identity, resolve_model_source

    source = resolve_model_source(model_args)
    stamp = ""
    path = Path(source)
    if path.exists():
        stamp = ";".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}"
                         for p in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")))
    adapter = peft_args.peft_model_id or ""
    if adapter and Path(adapter).exists():
        adapter += ";" + ";".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}"
                                  for p in sorted(Path(adapter).glob("adapter_model.*")))
    quant = quantization_identity(peft_args)  # a 4-bit / 8-bit reference gives other log-probs
    return f"{source}|{stamp}|{adapter}|{model_args.dtype}|{model_args.attn_implementation}|amp={amp}" + \
        (f"|quant={quant}" if quant else "")


def amp_name(training_args) -> str:
    """``bf16``, ``fp16`` or ``none``: the mixed precision of ``training_args``."""
    return "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "none"


def mixed_precision(model, training_args):
    """``torch.autocast`` matching ``--bf16`` / ``--fp16`` (a null context in float32)."""
    import torch

    if not (training_args.bf16 or training_args.fp16):
        return contextlib.nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if training_args.bf16 else torch.float16)


def _main_first_unless_collective(training_args, what: str):
    """``main_process_first`` around loading the model, except under DeepSpeed ZeRO-3: there the
    weights are partitioned while they load (``deepspeed.zero.Init``, collective over all ranks),
    so every rank must load at the same time (the main one alone would wait for the others forever)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    return training_args.main_process_first(desc=what)


def quiet_replicas() -> None:
    """Under several processes only the main one logs preftune's INFO messages (data report, reference
    log-probs, saved to ...); the others log warnings and errors (transformers does the same with
    ``--log_level_replica warning``)."""
    if not is_main_process():
        logging.getLogger("preftune").setLevel(logging.WARNING)


def configure_numerics(engine_args, device: Optional[str] = "auto") -> DevicePolicy:
    """The :class:`DevicePolicy` of ``device`` (``auto``: the GPU when there is one) with its numerics
    set (TF32 on CUDA; ``--flush_denormal`` on the CPU). For the commands without a trainer
    (``evaluate``, ``score``)."""
    policy = DevicePolicy.of(device)
    policy.configure_numerics(engine_args.flush_denormal)
    return policy
