"""Per-sequence log-probabilities of a laid-out batch, by the model's kind.

:func:`sequence_logps` is the engine's entry for every model with an LM head: the kind of the model
(:func:`preftune.engine.kinds.kind_for`) runs its forward once over the batch
(:mod:`preftune.engine.layout`) and scores the gathered hidden states with the chunked LM head
(:mod:`preftune.engine.lm_head`); the per-sequence sums are the same numbers whatever the layout.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from preftune.engine.kinds import kind_for
from preftune.errors import UnsupportedModelError
from preftune.types import PolicyLogps


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: Optional[int] = None) -> PolicyLogps:
    """Run the model over a laid-out batch and sum log-probs per sequence (``kind_for(model).score``).

    ``batch`` comes from the kind's ``collate`` (on the model's device). Returns :class:`PolicyLogps`
    with ``(B,)`` float32 sums (nats) and token counts, the batch's precomputed reference log-probs
    when present, and the kind's extra loss terms with their weights.

    Raises:
        UnsupportedModelError: a reward model (value head, no LM head), or a model no kind supports.
    """
    kind = kind_for(model)
    if kind.scores != "logps":  # a reward model: no LM head to score tokens with
        raise UnsupportedModelError(f"{type(model).__name__} is a reward model (value head, no LM head): it gives "
                                    "rewards (preftune.engine.rewards.sequence_rewards, --loss rm), not log-probs")
    return kind.score(model, batch, chunk_size)
