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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

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
    return f"{source}|{stamp}|{adapter}|{model_args.dtype}|{model_args.attn_implementation}|amp={amp}"


def setup(groups: tuple) -> Run:
    """Seed, load model/tokenizer/data, attach reference log-probs, build the trainer."""
    from preftune.data import build_datasets
    from preftune.engine.reference import attach_reference_logps
    from preftune.models import load_model_and_tokenizer, load_reference_model
    from preftune.peft_utils import reference_context

    model_args, peft_args, data_args, loss_args, engine_args, training_args = groups
    resolve_reference_options(loss_args, engine_args)  # --loss rm: no reference (ConfigError for the flag)
    set_seed(training_args.seed)
    configure_cpu_numerics(engine_args)
    # continuing an adapter: its starting state is the DPO reference, kept as a frozen second adapter
    # (only needed when the reference is computed during training, not when precomputed once)
    live_reference = loss_args.needs_reference and not engine_args.precompute_ref_log_probs
    model, tokenizer = load_model_and_tokenizer(model_args, peft_args,
                                                with_reference_adapter=bool(peft_args.peft_model_id) and live_reference,
                                                reward_model=loss_args.is_reward_model)
    if getattr(training_args, "gradient_checkpointing", False) and peft_args.use_peft:
        from preftune.models import prepare_for_gradient_checkpointing

        prepare_for_gradient_checkpointing(model)
    data = build_datasets(data_args, tokenizer, seed=training_args.seed)  # logs its report
    if loss_args.is_reward_model:  # identical pairs skipped and counted
        from preftune.score import prepare_reward_data

        data = prepare_reward_data(data)

    ref_ctx, ref_model = None, None
    if loss_args.needs_reference:
        if peft_args.use_peft:
            ref_ctx = functools.partial(reference_context, model)
        if engine_args.precompute_ref_log_probs:
            # computed before any update, so the model as loaded *is* the reference: a continued
            # adapter as loaded, or (fresh LoRA) the base model, which adapters-off computes exactly
            pairs = data.train + (data.eval or [])
            with _mixed_precision(model, training_args):  # same numerics as the training forward
                amp = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "none"
                attach_reference_logps(model, pairs, model_key=model_identity(model_args, peft_args, amp),
                                       reference_context=None if peft_args.peft_model_id else ref_ctx,
                                       batch_size=training_args.per_device_eval_batch_size,
                                       chunk_size=engine_args.logprob_chunk_size)
        elif not peft_args.use_peft:
            ref_model = load_reference_model(model_args)

    trainer = PreferenceTrainer(
        model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval,
        processing_class=tokenizer, loss_args=loss_args, engine_args=engine_args,
        reference_context=ref_ctx, ref_model=ref_model, pad_token_id=tokenizer.pad_token_id or 0)
    return Run(groups, model, tokenizer, trainer, data.report)


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
    """``latest`` → the newest ``checkpoint-*`` in ``output_dir``; a path as is; None/false → None.

    Raises ``FileNotFoundError`` when ``latest`` finds no checkpoint or the path is missing.
    """
    if value in (None, "", "false", "False", "no"):
        return None
    if value in ("latest", "true", "True"):
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint-* directory in {output_dir}")
        return last
    if not Path(value).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint directory")
    return value


def train(run: Run) -> dict[str, float]:
    """Train (resuming when asked) and return the train metrics."""
    args = run.trainer.args
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    result = run.trainer.train(resume_from_checkpoint=checkpoint)
    return dict(result.metrics)


def save(run: Run, metrics: dict[str, float]) -> Path:
    """Write the adapter (or model), tokenizer, state, results and resolved config to output_dir."""
    from preftune.peft_utils import save_adapter

    trainer = run.trainer
    out = Path(trainer.args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(run.model, "peft_config"):
        save_adapter(run.model, out)
        run.tokenizer.save_pretrained(out)
    else:
        trainer.save_model(str(out))
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    (out / "preftune_config.yaml").write_text(config_to_yaml(run.groups))
    (out / "data_report.txt").write_text(run.data_report + "\n")
    logger.info("saved to %s", out)
    if run.groups[3].is_reward_model:  # the head again, as ms-swift's value_head.safetensors
        from preftune.score import save_value_head

        save_value_head(run.model, out)
    return out


def run(groups: tuple) -> dict[str, float]:
    """The whole lifecycle; returns the train metrics (plus the final eval metrics when there is an eval split)."""
    r = setup(groups)
    metrics = train(r)
    if r.trainer.eval_dataset is not None:
        state = r.trainer.state
        last = [h for h in state.log_history if "eval_loss" in h]
        if last and last[-1].get("step") == state.global_step:  # evaluated at the last step already
            eval_metrics = {k: v for k, v in last[-1].items() if k.startswith("eval_")}
        else:
            eval_metrics = r.trainer.evaluate()
        r.trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    save(r, metrics)
    return metrics
