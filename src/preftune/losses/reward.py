"""The reward-model loss ``rm``: pairwise Bradley-Terry over value-head rewards
(:class:`preftune.types.PairRewards`, ``(B,)`` tensors), TRL 1.16 ``RewardTrainer``'s loss and metrics."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from preftune.types import LossOutput, PairRewards

from .base import WHERE, compute_dtype


def _prepare_rewards(rewards: PairRewards) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Check and cast the reward-model inputs: ``(chosen, rejected, margin)``, all ``(B,)``.

    Raises:
        ValueError: ``rewards`` is not a :class:`PairRewards`, a field is not a floating 1-D tensor of
            one shared shape ``(B,)`` with ``B >= 1``, or the margin holds a non-finite value.
    """
    if not isinstance(rewards, PairRewards):
        raise ValueError(f"{WHERE}: loss 'rm' needs PairRewards (preftune.engine.rewards.sequence_rewards), "
                         f"got {type(rewards).__name__}")
    shape = None
    for name in ("chosen_rewards", "rejected_rewards", "margin"):
        value = getattr(rewards, name)
        if value is None and name == "margin":
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] < 1 \
                or not value.is_floating_point():
            desc = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{WHERE}: PairRewards.{name} must be a floating 1-D tensor of shape (B,), B >= 1; "
                             f"got {desc}")
        if shape is None:
            shape = value.shape
        elif value.shape != shape:
            raise ValueError(f"{WHERE}: PairRewards.{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    dtype = compute_dtype(rewards.chosen_rewards)
    margin = rewards.margin
    if margin is not None:
        if not bool(torch.isfinite(margin).all()):
            raise ValueError(f"{WHERE}: PairRewards.margin holds a non-finite value: {margin.tolist()}")
        margin = margin.detach().to(dtype)
    return rewards.chosen_rewards.to(dtype), rewards.rejected_rewards.to(dtype), margin


def rm_loss(rewards: PairRewards, *, center_rewards_coefficient: Optional[float] = None) -> LossOutput:
    """Pairwise Bradley-Terry reward-model loss with optional margin and reward centering.

    ``loss_i = -log sigmoid(r_c,i - r_r,i - m_i) + c * (r_c,i + r_r,i)^2`` over ``(B,)`` rewards:
    the pairwise ranking loss of Ouyang et al. 2022 (InstructGPT, arXiv 2203.02155, Eq. 1), the
    per-pair margin ``m`` of Llama 2 (arXiv 2307.09288, Sec. 3.2.2; 0 without one) and the centering
    term of Eisenstein et al. 2023 (arXiv 2312.09244) with weight ``c = center_rewards_coefficient``
    (none when None). ``losses.mean()`` equals TRL 1.16 ``RewardTrainer``'s batch loss,
    ``mean(-log sigmoid(.)) + c * mean((r_c + r_r)^2)``.

    The rewards are the unitless head values; ``chosen_rewards`` / ``rejected_rewards`` of the output
    are those, detached. Metrics (TRL's names and definitions, batch values): ``accuracy`` (share of
    pairs with ``r_c > r_r``), ``margin`` (mean ``r_c - r_r``), ``min_reward`` / ``mean_reward`` /
    ``max_reward`` over all ``2B`` rewards.

    Raises:
        ValueError: bad ``rewards`` (see :func:`_prepare_rewards`) or a negative / non-finite
            ``center_rewards_coefficient``.
    """
    chosen, rejected, margin = _prepare_rewards(rewards)
    diff = chosen - rejected
    losses = -F.logsigmoid(diff if margin is None else diff - margin)
    if center_rewards_coefficient is not None:
        c = float(center_rewards_coefficient)
        if not (c >= 0 and c < float("inf")):
            raise ValueError(f"{WHERE}: center_rewards_coefficient must be finite and >= 0, got {c}")
        losses = losses + c * (chosen + rejected) ** 2
    every = torch.cat([chosen, rejected]).detach()
    metrics = {
        "accuracy": (diff > 0).to(diff.dtype).mean().detach(),
        "margin": diff.mean().detach(),
        "min_reward": every.min(),
        "mean_reward": every.mean(),
        "max_reward": every.max(),
    }
    return LossOutput(losses, chosen.detach(), rejected.detach(), metrics)

