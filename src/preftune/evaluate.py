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
from preftune.engine.layout import collate_pairs
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
    sums: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                batch = collate_pairs(chunk, share_prompt=engine_args.share_prompt,
                                      padding_free=engine_args.padding_free)
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


def run_evaluate(model_args, data_args, loss_args, engine_args, eval_args: EvaluateArguments) -> dict[str, float]:
    """Load the model (+ adapter) and data, attach reference log-probs if needed, evaluate."""
    from peft import PeftModel

    from preftune.config import PeftArguments
    from preftune.data import build_datasets
    from preftune.engine.reference import attach_reference_logps
    from preftune.models import load_model, load_tokenizer
    from preftune.peft_utils import reference_context
    from preftune.train import configure_cpu_numerics, model_identity

    configure_cpu_numerics(engine_args)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, training=False)
    if eval_args.adapter:
        model = PeftModel.from_pretrained(model, eval_args.adapter)
    data = build_datasets(data_args, tokenizer, seed=eval_args.seed)  # logs its report
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
