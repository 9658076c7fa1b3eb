"""Small typed records shared by the data pipeline, the engine, the losses and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class TokenizedPair:
    """One preference pair after tokenisation.

    ``prompt_ids`` is the shared context; ``chosen_ids`` / ``rejected_ids`` are exactly the
    completion tokens the model is scored on (EOS appended once). Lists of token ids.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    # Optional cached reference log-probs (summed over completion tokens), filled by
    # preftune.engine.reference when --precompute_ref_log_probs is on.
    ref_chosen_logps: Optional[float] = None
    ref_rejected_logps: Optional[float] = None

    @property
    def num_tokens_logical(self) -> int:
        """Tokens of (prompt + chosen) + (prompt + rejected): what a padded-free two-sequence layout runs."""
        p = len(self.prompt_ids)
        return 2 * p + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def num_tokens_unique(self) -> int:
        """Tokens of prompt once + chosen + rejected: what the shared-prompt layout runs."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class PolicyLogps:
    """Per-sequence log-probabilities of a batch of B pairs, the input of every loss.

    All tensors have shape ``(B,)``. ``*_logps`` are sums of per-token log-probs (nats) over the
    completion tokens; ``*_lengths`` are the completion token counts (float). ``ref_*`` are the
    same sums under the reference policy (DPO family only).
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    ref_chosen_logps: Optional[torch.Tensor] = None
    ref_rejected_logps: Optional[torch.Tensor] = None
    # Extra loss terms the model computed on the way (scalars), added to every loss by the trainer
    # with their weights: ``{"aux_loss": ...}`` (mixture-of-experts router load balancing).
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LossOutput:
    """What a loss returns.

    ``losses``: per-example loss ``(B,)`` whose mean is the batch loss (the NLL / BC term, a
    token-mean over the batch as in TRL, is spread over the examples so that the mean is exact).
    ``chosen_rewards`` / ``rejected_rewards``: ``(B,)``, detached. ``metrics``: extra detached
    scalars with TRL's names (``nll_loss``, ``logps/chosen``, ``logps/rejected``,
    ``log_odds_ratio``, ``log_odds_chosen`` ...).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
