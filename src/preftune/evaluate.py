"""Preference evaluation of a model (or base + adapter) on a data set.

For every pair the model's kind scores chosen and rejected (per-sequence log-probs of a policy, or a
reward model's rewards), the loss turns them into chosen/rejected rewards (reference log-probs for
DPO, computed once and cached), and the report gives the preference accuracy (share of pairs with
reward margin > 0), the mean margin and the loss's other metrics, averaged over pairs.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Optional

from preftune.config import ConfigError, EngineArguments, LossArguments
from preftune.engine.kinds import kind_for
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
    device: str = field(default="auto", metadata={"help": "Where the model runs: auto (the GPU when there is one), "
                                                  "cpu, cuda or cuda:N."})

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"--batch_size must be > 0, got {self.batch_size}")
        if self.split not in ("all", "train", "eval"):
            raise ConfigError(f"--split must be all, train or eval, got {self.split!r}")


def evaluate_pairs(model, pairs: list[TokenizedPair], loss_args: LossArguments, engine_args: EngineArguments,
                   *, batch_size: int = 8, pad_token_id: int = 0) -> dict[str, float]:
    """The loss's metrics over ``pairs``, scored by the model's kind (policy log-probs or a reward model's rewards).

    Pair-weighted means of ``loss`` and of every metric of the loss (a policy's ``rewards/accuracies`` —
    share of pairs with margin > 0 —, ``rewards/margins``, ``rewards/chosen``, ``rewards/rejected``,
    ``logps/*`` ...; a reward model's ``accuracy``, ``margin``, ``mean_reward``: TRL's names), except
    ``min_*`` / ``max_*`` metrics, which are the minimum / maximum over all pairs; and ``num_pairs``.
    Pairs need ``ref_*`` filled for losses with a reference (the DPO family).
    """
    from preftune.score import scored_batches

    sums: dict[str, float] = {}
    extremes: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for chunk, scores in scored_batches(model, pairs, engine_args, batch_size=batch_size,
                                            pad_token_id=pad_token_id, progress="evaluate"):  # issue 26: a bar
            out = compute_loss(scores, loss_args)
            sums["loss"] = sums.get("loss", 0.0) + float(out.losses.sum())
            for key, value in out.metrics.items():
                if key.startswith(("min_", "max_")):
                    pick = min if key.startswith("min_") else max
                    extremes[key] = pick(extremes.get(key, float(value)), float(value))
                else:
                    sums[key] = sums.get(key, 0.0) + float(value) * len(chunk)
    finally:
        model.train(was_training)
    n = max(len(pairs), 1)
    result = {k: v / n for k, v in sums.items()}
    result.update(extremes)
    result["num_pairs"] = len(pairs)
    return result


def _select(data, split: str) -> list[TokenizedPair]:
    """The pairs of ``--split``: all, train or eval. Raises :class:`ConfigError` for eval without an eval split."""
    if split == "eval":
        if data.eval is None:
            raise ConfigError("--split eval needs --eval_ratio or --eval_file")
        return data.eval
    return data.train if split == "train" else data.train + (data.eval or [])


def _open_model(model_args, loss_args, adapter: Optional[str]):
    """``(model, tokenizer)`` for evaluation: the loss table says policy or reward model; a reward
    model's directory (a ``SEQ_CLS`` adapter) with a policy loss is a :class:`ConfigError`."""
    from peft import PeftModel

    from preftune.models import load_model, load_tokenizer
    from preftune.score import adapter_task, open_reward_model

    reward_dir = bool(adapter) and adapter_task(adapter) == "SEQ_CLS"
    if loss_args.spec.consumes == "rewards":
        return open_reward_model(model_args, adapter or model_args.model_name_or_path)
    if reward_dir:
        raise ConfigError(f"--adapter {adapter} is a reward model (value head); evaluate it with --loss rm")
    if adapter:
        from preftune.generate import check_adapter_dir

        check_adapter_dir(adapter)  # a missing directory or adapter_config.json: one line, exit 2 (issue 25)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, training=False)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    return model, tokenizer


def run_evaluate(model_args, data_args, loss_args, engine_args, eval_args: EvaluateArguments) -> dict[str, float]:
    """Load the model (+ adapter) and data, attach reference log-probs if needed, evaluate.

    Pairs the model kind leaves out (a reward model: identical chosen and rejected tokens) are counted
    in ``num_identical_skipped``.

    Raises:
        preftune.errors.ConfigError: a reward model's directory with a policy loss; ``--split eval``
            without an eval split.
    """
    from preftune.config import PeftArguments
    from preftune.data import build_datasets
    from preftune.data.pipeline import refuse_missing_rejected
    from preftune.engine.forward import configure_for_loss
    from preftune.engine.reference import attach_reference_logps
    from preftune.models import reference_context
    from preftune.run_setup import configure_numerics, model_identity, pad_token_id

    policy = configure_numerics(engine_args, eval_args.device)
    model, tokenizer = _open_model(model_args, loss_args, eval_args.adapter)
    if getattr(model, "quantization_method", None) is None:
        model.to(policy.device)
    kind = kind_for(model)
    configure_for_loss(loss_args, model)  # LD-DPO / WPO sums (the reference is this model too)
    data = build_datasets(data_args, tokenizer, seed=eval_args.seed, **kind.tokenize_options(model))  # logs its report
    refuse_missing_rejected(data.train, loss_args.loss, "evaluate")
    if loss_args.spec.consumes == "unpaired_logps":  # KTO: unpaired examples, KL partners within --batch_size
        from preftune.data.unpaired import prepare_kto

        prepare_kto(data, kl=loss_args.loss == "kto", batch_size=eval_args.batch_size, max_length=data_args.max_length,
                    desirable_weight=loss_args.desirable_weight, undesirable_weight=loss_args.undesirable_weight)
    pairs = _select(data, eval_args.split)
    kept = _select(kind.prepare_data(data), eval_args.split)
    if loss_args.needs_reference:
        ctx = functools.partial(reference_context, model) if eval_args.adapter else None
        attach_reference_logps(model, kept, model_key=model_identity(model_args, PeftArguments()),
                               reference_context=ctx, batch_size=eval_args.batch_size,
                               chunk_size=engine_args.logprob_chunk_size)
    result = evaluate_pairs(model, kept, loss_args, engine_args, batch_size=eval_args.batch_size,
                            pad_token_id=pad_token_id(tokenizer))
    result["num_identical_skipped"] = len(pairs) - len(kept)
    return result
