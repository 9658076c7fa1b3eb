"""Per-sequence rewards of a reward model (value head) over a laid-out batch.

The reward-model counterpart of :func:`preftune.engine.logprobs.sequence_logps`: the body runs once
over the batch's rows (:mod:`preftune.engine.layout`), the hidden state at each sequence's last
token goes through the scalar head, and the ``2B`` values become chosen / rejected rewards.
"""

from __future__ import annotations

import torch
from torch import nn

from preftune.engine.kinds import kind_for
from preftune.engine.logprobs import prepare_forward
from preftune.errors import UnsupportedModelError
from preftune.types import PairRewards


def sequence_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> PairRewards:
    """Rewards of the B pairs of ``batch`` (from :func:`preftune.engine.layout.collate_pairs`, on the
    model's device).

    Returns :class:`PairRewards`: ``chosen_rewards`` / ``rejected_rewards`` ``(B,)`` float32, the
    head's values at the last non-pad token of prompt + chosen and prompt + rejected — the numbers
    ``AutoModelForSequenceClassification(...).logits[:, 0]`` gives for each sequence alone — and
    the batch's ``margin`` ``(B,)`` when it has one.

    Raises:
        UnsupportedModelError: ``model`` is not a reward model (no value head) or has
            ``num_labels != 1``.
        ValueError: the batch was laid out with a pad id other than the model's
            ``config.pad_token_id`` (the rewards would be read at other tokens than transformers reads them).
    """
    kind = kind_for(model)
    if not getattr(kind, "scores_sequences", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} ({kind.name} kind) has no value head: rewards need a reward model "
            "(AutoModelForSequenceClassification, num_labels=1; preftune train --loss rm)")
    _check_pad(model, batch)
    prepare_forward(model, batch)  # memory budget, heap trimming, fused LoRA: as for the log-prob kinds
    hidden, extras = kind.hidden_at_targets(model, batch)
    values = kind.head(model)(hidden).squeeze(-1).float()
    b = int(batch["num_pairs"])
    margin = batch.get("margin")
    return PairRewards(chosen_rewards=values[:b], rejected_rewards=values[b:],
                       margin=None if margin is None else margin.float(), extra_losses=extras)


def _check_pad(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_pad = getattr(text_config, "pad_token_id", None)
    batch_pad = batch.get("pad_token_id")
    if model_pad is not None and batch_pad is not None and int(batch_pad) != int(model_pad):
        raise ValueError(
            f"the batch was laid out with pad id {int(batch_pad)} but the reward model's config.pad_token_id is "
            f"{model_pad}: pass pad_token_id={model_pad} to collate_pairs (the tokenizer's pad id), or set "
            "config.pad_token_id to it")
