"""The training recipe: setup → train → save.

``preftune train`` parses the configuration groups (:mod:`preftune.cli_args`) and calls
:func:`run`. Each stage is a small function so that the lifecycle stays visible:

* :func:`setup` — seed, model + tokenizer (+ LoRA), data, reference log-probs, the trainer;
* :func:`train` — ``Trainer.train`` (resuming from ``latest`` or a path when asked);
* :func:`save` — adapter or model + tokenizer, ``trainer_state.json`` (with ``log_history``),
  ``train_results.json`` and the resolved ``preftune_config.yaml``.
"""

from __future__ import annotations

import functools
import logging
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

from transformers import set_seed

from preftune import outputs
from preftune.cli_args import config_to_yaml
from preftune.config import ModelArguments, PeftArguments, resolve_reference_options
from preftune.trainer import PreferenceTrainer

logger = logging.getLogger("preftune.train")


@dataclass
class Run:
    """Everything a training run holds after :func:`setup`."""

    groups: tuple
    model: Any
    tokenizer: Any
    trainer: PreferenceTrainer
    data_report: str


def model_identity(model_args: ModelArguments, peft_args: PeftArguments, amp: str = "none") -> str:
    """A string that identifies the reference policy for the reference-log-prob cache: model source
    (+ weight files' sizes and times), adapter, dtype, attention kernel, mixed precision ``amp``."""
    from preftune.models import resolve_model_source

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
    from preftune.models_quant import quantization_identity

    quant = quantization_identity(peft_args)  # a 4-bit / 8-bit reference gives other log-probs
    return f"{source}|{stamp}|{adapter}|{model_args.dtype}|{model_args.attn_implementation}|amp={amp}" + \
        (f"|quant={quant}" if quant else "")


def setup(groups: tuple) -> Run:
    """Seed, load model/tokenizer/data, attach reference log-probs, build the trainer."""
    from preftune.data import build_datasets
    from preftune.data.pipeline import check_preference_signal
    from preftune.models import load_model_and_tokenizer

    model_args, peft_args, data_args, loss_args, engine_args, training_args = groups
    quiet_replicas()
    # several processes: the main process checks (and clears or locks) the output directory, converts
    # or downloads the model and loads the data first; the others wait, then find them ready
    with training_args.main_process_first(local=False, desc="preparing the output directory"):
        outputs.prepare_output_dir(groups)  # writable, not another run's, resume config matches: before any loading
    resolve_reference_options(loss_args, engine_args)  # --loss rm: no reference (ConfigError for the flag)
    set_seed(training_args.seed)
    configure_cpu_numerics(engine_args)
    # continuing an adapter: its starting state is the DPO reference, kept as a frozen second adapter
    # (only needed when the reference is computed during training, not when precomputed once)
    live_reference = loss_args.needs_reference and not engine_args.precompute_ref_log_probs
    with _main_first_unless_collective(training_args, "loading the model"):  # GGUF conversion, Hub downloads: once
        model, tokenizer = load_model_and_tokenizer(model_args, peft_args,
                                                    with_reference_adapter=bool(peft_args.peft_model_id) and live_reference,
                                                    reward_model=loss_args.is_reward_model)
    from preftune.engine.kinds import kind_for

    kind_for(model).head(model)  # an architecture no kind supports: one clear error before any data is tokenised
    if getattr(training_args, "gradient_checkpointing", False) and peft_args.use_peft:
        from preftune.models import prepare_for_gradient_checkpointing

        prepare_for_gradient_checkpointing(model)
    with training_args.main_process_first(desc="loading the data"):  # Hub datasets downloaded once
        data = build_datasets(data_args, tokenizer, seed=training_args.seed)  # logs its report (main process)
    check_preference_signal(data.train, loss_args.loss)  # every pair identical: DataError; some: a warning
    if loss_args.is_reward_model:  # identical pairs skipped and counted
        from preftune.score import prepare_reward_data

        data = prepare_reward_data(data)
    ref_ctx, ref_model = attach_reference(groups, model, data)
    # (before the trainer: config_to_yaml builds a TrainingArguments, which resets accelerate's state)
    run_config = config_to_yaml(groups)
    trainer = PreferenceTrainer(**trainer_kwargs(groups, model, tokenizer, data, ref_ctx, ref_model))
    trainer.run_config_yaml = run_config  # written into every checkpoint (resume checks it)
    return Run(groups, model, tokenizer, trainer, data.report)


def attach_reference(groups: tuple, model, data, *, ref_model=None, model_key: Optional[str] = None,
                     continuing: Optional[bool] = None, batch_size: Optional[int] = None):
    """The reference policy of the DPO family: ``(reference_context, live_ref_model)``; ``(None, None)``
    for losses without one.

    With ``--precompute_ref_log_probs`` the reference log-probs are computed here, before any update,
    and stored on the pairs of ``data`` (cached on disk under ``model_key``, default
    :func:`model_identity`): by ``ref_model`` when given, else by the model as loaded — a continued
    adapter as loaded (``continuing``, default: ``--peft_model_id`` is set), or, for a fresh LoRA, the
    base model, which adapters-off computes exactly. Without it the reference runs live in each step:
    ``ref_model`` when given, adapters-off (LoRA) or a second frozen copy loaded from ``model_args``.
    ``batch_size``: pairs per precompute batch (default ``per_device_eval_batch_size``).
    """
    from preftune.engine.reference import attach_reference_logps
    from preftune.models import load_reference_model
    from preftune.peft_utils import reference_context

    model_args, peft_args, _, loss_args, engine_args, training_args = groups
    if not loss_args.needs_reference:
        return None, None
    continuing = bool(peft_args.peft_model_id) if continuing is None else continuing
    ref_ctx = functools.partial(reference_context, model) if peft_args.use_peft and ref_model is None else None
    if engine_args.precompute_ref_log_probs:
        reference = model if ref_model is None else ref_model
        pairs = data.train + (data.eval or [])
        with _mixed_precision(reference, training_args):  # same numerics as the training forward
            amp = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "none"
            attach_reference_logps(reference, pairs, model_key=model_key or model_identity(model_args, peft_args, amp),
                                   reference_context=None if continuing or ref_model is not None else ref_ctx,
                                   batch_size=batch_size or training_args.per_device_eval_batch_size,
                                   chunk_size=engine_args.logprob_chunk_size)
        return ref_ctx, None
    if ref_model is not None:
        return None, ref_model
    if not peft_args.use_peft:
        return None, load_reference_model(model_args)
    return ref_ctx, None


def trainer_kwargs(groups: tuple, model, tokenizer, data, ref_ctx=None, ref_model=None) -> dict[str, Any]:
    """The keyword arguments of :class:`PreferenceTrainer` for ``groups``, a model, its tokenizer, the
    tokenised ``data`` (:class:`preftune.data.PreferenceData`) and the reference of :func:`attach_reference`."""
    _, _, _, loss_args, engine_args, training_args = groups
    return dict(model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval,
                processing_class=tokenizer, loss_args=loss_args, engine_args=engine_args,
                reference_context=ref_ctx, ref_model=ref_model,
                pad_token_id=getattr(tokenizer, "tokenizer", tokenizer).pad_token_id or 0)  # a processor's tokenizer


def _main_first_unless_collective(training_args, what: str):
    """``main_process_first`` around loading the model, except under DeepSpeed ZeRO-3: there the
    weights are partitioned while they load (``deepspeed.zero.Init``, collective over all ranks),
    so every rank must load at the same time (the main one alone would wait for the others forever)."""
    import contextlib

    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    return training_args.main_process_first(desc=what)


def quiet_replicas() -> None:
    """Under several processes only the main one logs preftune's INFO messages (data report, reference
    log-probs, saved to ...); the others log warnings and errors (transformers does the same with
    ``--log_level_replica warning``)."""
    if not outputs.is_main_process():
        logging.getLogger("preftune").setLevel(logging.WARNING)


def _mixed_precision(model, training_args):
    """``torch.autocast`` matching ``--bf16`` / ``--fp16`` (a null context in float32)."""
    import contextlib

    import torch

    if not (training_args.bf16 or training_args.fp16):
        return contextlib.nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if training_args.bf16 else torch.float16)


def configure_cpu_numerics(engine_args) -> None:
    """``--flush_denormal``: flush denormal floats to zero on CPU (x86 SSE3; no effect on GPU).

    After the first LoRA updates many gradient products fall below 1e-38; denormal arithmetic
    is ~100x slower on x86, and a CPO step on SmolLM2 took 36.8 s instead of 4.7 s here (batch 8,
    HH-RLHF). Values that small do not change the result at float32 precision.
    """
    import torch

    if engine_args.flush_denormal and torch.set_flush_denormal(True):
        logger.info("CPU: denormal floats flushed to zero (--flush_denormal false to keep them)")


def resolve_checkpoint(value: Optional[str], output_dir: str) -> Optional[str]:
    """``latest`` → the newest *complete* ``checkpoint-*`` in ``output_dir`` (partial or corrupted
    ones skipped with a warning); a path as is (verified when it has a completeness marker);
    None/false → None. See :func:`preftune.outputs.resolve_checkpoint`.

    Raises ``FileNotFoundError`` when ``latest`` finds no complete checkpoint or the path is missing.
    """
    return outputs.resolve_checkpoint(value, output_dir)


def train(run: Run) -> dict[str, float]:
    """Train (resuming when asked) and return the train metrics."""
    args = run.trainer.args
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    result = run.trainer.train(resume_from_checkpoint=checkpoint)
    return dict(result.metrics)


def save(run: Run, metrics: dict[str, float]) -> Path:
    """Write the adapter (or model), tokenizer, state, results (``eval_*`` also to
    ``eval_results.json``) and resolved config to output_dir: staged, then moved into place, the
    weights checked for non-finite values first (:func:`preftune.outputs.save_final`)."""
    out = outputs.save_final(run.trainer, run.model, run.tokenizer, metrics,
                             {"preftune_config.yaml": run.trainer.run_config_yaml or config_to_yaml(run.groups),
                              "data_report.txt": run.data_report + "\n"})
    logger.info("saved to %s", out)
    if run.groups[3].is_reward_model:  # the head again, as ms-swift's value_head.safetensors
        from preftune.score import save_value_head

        save_value_head(run.model, out)
    copy_dir = run.groups[1].lora_adapter_dir  # --lora_adapter_dir (ORPO scripts): a second copy
    if copy_dir and hasattr(run.model, "peft_config"):
        from preftune.peft_utils import save_adapter

        save_adapter(run.model, copy_dir)
        run.tokenizer.save_pretrained(copy_dir)
        logger.info("adapter also written to %s (--lora_adapter_dir)", copy_dir)
    return out


def run(groups: tuple) -> dict[str, float]:
    """The whole lifecycle; returns the train metrics (plus the final eval metrics when there is an eval split)."""
    try:
        r = setup(groups)
        metrics = train(r)
        if r.trainer.eval_dataset is not None:
            state = r.trainer.state
            last = [h for h in state.log_history if "eval_loss" in h]
            if last and last[-1].get("step") == state.global_step:  # evaluated at the last step already
                eval_metrics = {k: v for k, v in last[-1].items() if k.startswith("eval_")}
            else:
                eval_metrics = r.trainer.evaluate()
            metrics.update(eval_metrics)  # save() writes them to eval_results.json too
        save(r, metrics)
    finally:  # the output directory's lock (taken by setup), so a later run in another process may use it
        outputs.release_output_dir(groups[-1].output_dir)
    return metrics


class TrainResult(NamedTuple):
    """What :func:`run_config` (``preftune.train(config)``) returns; unpacks as ``out, metrics = ...``.

    ``output_dir``: the directory holding the adapter (or model), tokenizer, ``trainer_state.json``,
    ``train_results.json`` and ``preftune_config.yaml``. ``metrics``: the train metrics
    (``train_loss``, ``train_runtime`` ...) plus the final ``eval_*`` metrics when there is an eval split.
    """

    output_dir: Path
    metrics: dict[str, float]


def run_config(config: Union[dict, str, Path, tuple], **overrides: Any) -> TrainResult:
    """``preftune train`` from Python (a notebook, a script): parse, train, save; return where and how it went.

    ``config``: a dict of flag names to values (the keys of a YAML config, e.g.
    ``{"loss": "dpo", "use_peft": True, "max_steps": 10}``), the path of a YAML config, or the tuple
    of configuration groups (:func:`preftune.cli_args.parse_groups`'s result). ``overrides``: more
    ``flag=value`` pairs that win over ``config``, as flags win over a YAML file; not allowed with a
    groups tuple. Also callable as ``preftune.train(config, **overrides)``.

    Raises :class:`preftune.config.ConfigError` (unknown key, with the closest valid name; invalid
    value), :class:`preftune.data.DataError` and :class:`preftune.errors.ModelLoadError` like the CLI.
    """
    from preftune.cli_args import TRAIN_GROUPS, _valid_names, _yaml_to_argv, parse_groups
    from preftune.config import ConfigError

    source = "preftune.train(config)"
    if isinstance(config, tuple):
        if overrides:
            raise ConfigError(f"{source}: keyword overrides need a dict or YAML config, not a tuple of groups")
        groups = config
    elif isinstance(config, dict):
        groups = parse_groups(_yaml_to_argv({**config, **overrides}, source, _valid_names(TRAIN_GROUPS)))
    elif isinstance(config, (str, Path)):
        extra = _yaml_to_argv(overrides, source, _valid_names(TRAIN_GROUPS))
        groups = parse_groups([str(config), *extra])
    else:
        raise ConfigError(f"{source}: expected a dict, a YAML path or a tuple of config groups, "
                          f"got {type(config).__name__}")
    metrics = run(groups)
    return TrainResult(Path(groups[-1].output_dir), metrics)


class _CallableModule(types.ModuleType):
    """Makes ``preftune.train(config)`` work: importing this submodule binds the *module* to the
    package attribute ``train``, so the module itself forwards calls to :func:`run_config`."""

    def __call__(self, config: Union[dict, str, Path, tuple], **overrides: Any) -> TrainResult:
        return run_config(config, **overrides)


sys.modules[__name__].__class__ = _CallableModule
