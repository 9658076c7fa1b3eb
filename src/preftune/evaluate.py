"""Preference evaluation of a model (or base + adapter) on a data set.

For every pair the engine computes the per-sequence log-probs, the loss's reward function turns
them into chosen/rejected rewards (reference log-probs for DPO, computed once and cached), and
the report gives the preference accuracy (share of pairs with reward margin > 0), the mean
margin and the other batch metrics, averaged over pairs.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from preftune.config import EngineArguments, LossArguments
from preftune.engine.layout_seq2seq import collate_for
from preftune.engine.logprobs import sequence_logps
from preftune.losses import compute_loss
from preftune.types import TokenizedPair

logger = logging.getLogger("preftune.evaluate")


@dataclass
class EvaluateArguments:
    """What to evaluate (besides the model, data, loss and engine groups)."""

    _argument_group_name = "evaluate"

    adapter: Optional[str] = field(default=None, metadata={"help": "LoRA adapter directory to evaluate on the base model."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per forward."})
    output_json: Optional[str] = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})
    seed: int = field(default=42, metadata={"help": "Seed (used by --eval_ratio splits)."})
    split: str = field(default="all", metadata={"help": "all (every record of --dataset), train or eval (the --eval_ratio split)."})

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"--batch_size must be > 0, got {self.batch_size}")
        if self.split not in ("all", "train", "eval"):
            raise ValueError(f"--split must be all, train or eval, got {self.split!r}")


def evaluate_pairs(model, pairs: list[TokenizedPair], loss_args: LossArguments, engine_args: EngineArguments,
                   *, batch_size: int = 8) -> dict[str, float]:
    """Pair-weighted means of the preference metrics over ``pairs``.

    Returns ``rewards/accuracies`` (share of pairs with margin > 0), ``rewards/margins``,
    ``rewards/chosen``, ``rewards/rejected``, ``loss``, ``logps/chosen``, ``logps/rejected``,
    ``num_pairs``. Pairs need ``ref_*`` filled for the DPO family.
    """
    device = next(model.parameters()).device
    collate = collate_for(model)  # encoder–decoder models: their own layout
    sums: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                batch = collate(chunk, share_prompt=engine_args.share_prompt, padding_free=engine_args.padding_free)
                batch = {k: v.to(device) for k, v in batch.items()}
                logps = sequence_logps(model, batch, engine_args.logprob_chunk_size)
                out = compute_loss(logps, loss_args)
                margins = out.chosen_rewards - out.rejected_rewards
                values = {
                    "loss": out.losses.sum(), "rewards/accuracies": (margins > 0).float().sum(),
                    "rewards/margins": margins.sum(), "rewards/chosen": out.chosen_rewards.sum(),
                    "rewards/rejected": out.rejected_rewards.sum(),
                }
                values.update({k: v * len(chunk) for k, v in out.metrics.items()})
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
    finally:
        model.train(was_training)
    n = max(len(pairs), 1)
    result = {k: v / n for k, v in sums.items()}
    result["num_pairs"] = len(pairs)
    return result


def evaluate_rewards(model, pairs: list[TokenizedPair], loss_args: LossArguments, engine_args: EngineArguments,
                     *, batch_size: int = 8, pad_token_id: int = 0) -> dict[str, float]:
    """Metrics of a reward model over ``pairs`` (``--loss rm``), TRL ``RewardTrainer``'s names.

    Pair-weighted means of ``loss``, ``accuracy`` (share of pairs whose chosen reward is higher),
    ``margin`` (mean chosen - rejected reward) and ``mean_reward`` (over all 2N rewards);
    ``min_reward`` / ``max_reward`` over every reward; ``num_pairs``.
    """
    from preftune.score import reward_batches
    from preftune.types import PairRewards

    sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "mean_reward": 0.0}
    low, high = float("inf"), float("-inf")
    was_training = model.training
    model.eval()
    try:
        batches = reward_batches(model, pairs, engine_args, batch_size=batch_size, pad_token_id=pad_token_id)
        for start, (chosen, rejected) in zip(range(0, len(pairs), batch_size), batches):
            chunk = pairs[start:start + batch_size]
            margin = None
            if any(p.margin is not None for p in chunk):
                margin = torch.tensor([p.margin or 0.0 for p in chunk])
            out = compute_loss(PairRewards(chosen, rejected, margin), loss_args)
            n = len(chunk)
            sums["loss"] += float(out.losses.sum())
            for key in ("accuracy", "margin"):
                sums[key] += float(out.metrics[key]) * n
            sums["mean_reward"] += float(chosen.sum() + rejected.sum()) / 2
            low, high = min(low, float(out.metrics["min_reward"])), max(high, float(out.metrics["max_reward"]))
    finally:
        model.train(was_training)
    n = max(len(pairs), 1)
    result = {k: v / n for k, v in sums.items()}
    result.update(min_reward=low if pairs else 0.0, max_reward=high if pairs else 0.0, num_pairs=len(pairs))
    return result


def _is_reward_adapter(adapter) -> bool:
    from preftune.score import adapter_task

    return bool(adapter) and (adapter_task(adapter) == "SEQ_CLS")


def run_reward_evaluate(model_args, data_args, loss_args, engine_args, eval_args: EvaluateArguments) -> dict[str, float]:
    """``preftune evaluate --loss rm --adapter DIR``: a reward model's accuracy and mean margin.

    Pairs with identical chosen and rejected tokens are left out (counted in ``num_identical_skipped``).

    Raises:
        preftune.config.ConfigError: ``DIR`` is a reward model but ``--loss`` is not ``rm``.
    """
    from preftune.config import ConfigError
    from preftune.data import build_datasets
    from preftune.data.pipeline import refuse_missing_rejected
    from preftune.score import open_reward_model

    if not loss_args.is_reward_model:
        raise ConfigError(f"--adapter {eval_args.adapter} is a reward model (value head); evaluate it with --loss rm")
    model, tokenizer = open_reward_model(model_args, eval_args.adapter or model_args.model_name_or_path)
    data = build_datasets(data_args, tokenizer, seed=eval_args.seed)  # logs its report
    refuse_missing_rejected(data.train, loss_args.loss, "evaluate")
    if eval_args.split == "eval":
        if data.eval is None:
            raise ConfigError("--split eval needs --eval_ratio or --eval_file")
        pairs = data.eval
    else:
        pairs = data.train if eval_args.split == "train" else data.train + (data.eval or [])
    kept = [p for p in pairs if p.chosen_ids != p.rejected_ids]
    result = evaluate_rewards(model, kept, loss_args, engine_args, batch_size=eval_args.batch_size,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    result["num_identical_skipped"] = len(pairs) - len(kept)
    return result


def run_evaluate(model_args, data_args, loss_args, engine_args, eval_args: EvaluateArguments) -> dict[str, float]:
    """Load the model (+ adapter) and data, attach reference log-probs if needed, evaluate."""
    from peft import PeftModel

    from preftune.config import PeftArguments
    from preftune.data import build_datasets
    from preftune.data.pipeline import refuse_missing_rejected
    from preftune.engine.reference import attach_reference_logps
    from preftune.models import load_model, load_tokenizer
    from preftune.peft_utils import reference_context
    from preftune.train import configure_cpu_numerics, model_identity

    configure_cpu_numerics(engine_args)
    if loss_args.is_reward_model or _is_reward_adapter(eval_args.adapter):
        return run_reward_evaluate(model_args, data_args, loss_args, engine_args, eval_args)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, training=False)
    if eval_args.adapter:
        model = PeftModel.from_pretrained(model, eval_args.adapter)
    data = build_datasets(data_args, tokenizer, seed=eval_args.seed)  # logs its report
    refuse_missing_rejected(data.train, loss_args.loss, "evaluate")
    if eval_args.split == "eval":
        if data.eval is None:
            raise ValueError("--split eval needs --eval_ratio or --eval_file")
        pairs = data.eval
    elif eval_args.split == "train":
        pairs = data.train
    else:
        pairs = data.train + (data.eval or [])
    if loss_args.needs_reference:
        ctx = functools.partial(reference_context, model) if eval_args.adapter else None
        attach_reference_logps(model, pairs, model_key=model_identity(model_args, PeftArguments()),
                               reference_context=ctx, batch_size=eval_args.batch_size,
                               chunk_size=engine_args.logprob_chunk_size)
    return evaluate_pairs(model, pairs, loss_args, engine_args, batch_size=eval_args.batch_size)
