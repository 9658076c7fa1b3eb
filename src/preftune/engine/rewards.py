"""Per-sequence rewards of a reward model (value head) over a laid-out batch.

The reward-model counterpart of :func:`preftune.engine.logprobs.sequence_logps`: the value-head kind
(:mod:`preftune.engine.kinds.value_head`) runs the body once over the batch's rows, the hidden state
at each sequence's last token goes through the scalar head, and the ``2B`` values become chosen /
rejected rewards.
"""

from __future__ import annotations

import torch
from torch import nn

from preftune.engine.kinds import kind_for
from preftune.errors import UnsupportedModelError
from preftune.types import PairRewards


def sequence_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> PairRewards:
    """Rewards of the B pairs of ``batch`` (``kind_for(model).score`` of a value-head model).

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
    if kind.scores != "rewards":
        raise UnsupportedModelError(
            f"{type(model).__name__} ({kind.name} kind) has no value head: rewards need a reward model "
            "(AutoModelForSequenceClassification, num_labels=1; preftune train --loss rm)")
    return kind.score(model, batch)
