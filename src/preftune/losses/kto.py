"""KTO and APO-zero (unpaired): losses over single completions labelled desirable or undesirable
(Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv 2402.01306;
D'Oosterlinck et al. 2024, "Anchored Preference Optimization", arXiv 2408.06266), over
:class:`preftune.types.PolicyLogps` ``(B,)`` tensors whose ``chosen_*`` score each example's
completion and ``rejected_*`` its KL partner (:mod:`preftune.data.unpaired`); ``labels`` ``(B,)`` bool.
TRL 1.16's ``KTOTrainer`` is the reference for every value and metric.
"""

from __future__ import annotations

from typing import Optional

import torch

from preftune.types import LossOutput, PolicyLogps

from .base import WHERE, check_positive, prepare

KTO_TYPES = ("kto", "apo_zero_unpaired")


def _labels(logps: PolicyLogps, size: int, device: torch.device) -> torch.Tensor:
    labels = logps.labels
    if labels is None:
        raise ValueError(f"{WHERE}: KTO needs PolicyLogps.labels ((B,) bool: desirable completions), which is "
                         "None; give unpaired data (prompt / completion / label) or paired data with --loss kto")
    if not isinstance(labels, torch.Tensor) or labels.shape != (size,):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{WHERE}: PolicyLogps.labels must have shape ({size},), got {shape}")
    return labels.to(device=device, dtype=torch.bool)


def kto_loss(logps: PolicyLogps, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, loss_type: str = "kto") -> LossOutput:
    """KTO (Ethayarajh et al. 2024, Eq. 7) or its APO-zero unpaired variant, per example.

    With ``r_i = logps_i - ref_logps_i`` (the completion's log-ratio, ``chosen_*`` fields) and the
    batch's KL estimate ``z = max(0, mean_j(kl_logps_j - ref_kl_logps_j))`` (the KL partners,
    ``rejected_*`` fields; detached, as in the paper's Sec. 4.1 and TRL):

    * ``kto``: desirable ``loss_i = λ_D (1 - σ(β (r_i - z)))``, undesirable
      ``loss_i = λ_U (1 - σ(β (z - r_i)))``;
    * ``apo_zero_unpaired`` (APO, Eq. 7, unpaired): desirable ``λ_D (1 - σ(β r_i))``, undesirable
      ``λ_U σ(β r_i)``; no KL term (``z`` is reported as 0 and the partner fields are not read).

    The batch loss is the mean of the ``(B,)`` losses, TRL's ``nanmean`` over desirable and
    undesirable examples together. Rewards ``β r_i``. Metrics with TRL's names: ``kl`` (``z``),
    ``rewards/chosen`` / ``logps/chosen`` (means over the desirable examples), ``rewards/rejected`` /
    ``logps/rejected`` (over the undesirable ones) — each only when the batch has such examples —,
    ``rewards/margins`` (their difference, when it has both) and ``count/desirable`` /
    ``count/undesirable``.

    Args:
        logps: ``PolicyLogps`` with ``(B,)`` tensors, reference sums and ``labels`` ``(B,)`` bool.
        beta: β (> 0). desirable_weight, undesirable_weight: λ_D, λ_U (> 0).
        loss_type: ``kto`` or ``apo_zero_unpaired``.

    Returns:
        ``LossOutput`` with ``losses (B,)``; ``chosen_rewards`` are the examples' rewards ``β r_i``
        and ``rejected_rewards`` the KL partners' ``β (kl_logps - ref_kl_logps)``.

    Raises:
        ValueError: a weight or β not > 0, an unknown ``loss_type``, missing reference sums or
            labels, bad shapes.
    """
    if loss_type not in KTO_TYPES:
        raise ValueError(f"{WHERE}: unknown KTO loss type {loss_type!r}; valid: {', '.join(KTO_TYPES)}")
    check_positive("beta", beta, loss_type)
    check_positive("desirable_weight", desirable_weight, loss_type)
    check_positive("undesirable_weight", undesirable_weight, loss_type)
    b = prepare(logps, loss_type, need_ref=True)
    labels = _labels(logps, b.size, b.chosen.device)
    ratio = b.chosen - b.ref_chosen
    partner = (b.rejected - b.ref_rejected).detach()
    if loss_type == "kto":
        kl = partner.mean().clamp(min=0)
        desirable = 1 - torch.sigmoid(beta * (ratio - kl))
        undesirable = 1 - torch.sigmoid(beta * (kl - ratio))
    else:
        kl = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
        desirable = 1 - torch.sigmoid(beta * ratio)
        undesirable = torch.sigmoid(beta * ratio)
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    rewards = beta * ratio.detach()
    metrics: dict[str, torch.Tensor] = {"kl": kl.detach()}
    n_d = labels.sum()
    metrics["count/desirable"] = n_d.to(rewards.dtype)
    metrics["count/undesirable"] = (b.size - n_d).to(rewards.dtype)
    means: dict[str, Optional[torch.Tensor]] = {}
    for side, mask in (("chosen", labels), ("rejected", ~labels)):
        if bool(mask.any()):
            means[side] = rewards[mask].mean()
            metrics[f"rewards/{side}"] = means[side]
            metrics[f"logps/{side}"] = b.chosen.detach()[mask].mean()
    if len(means) == 2:
        metrics["rewards/margins"] = means["chosen"] - means["rejected"]
    return LossOutput(losses, rewards, beta * partner, metrics)
