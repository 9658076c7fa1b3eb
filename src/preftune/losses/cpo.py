"""The CPO family: CPO (sigmoid, hinge, IPO), SimPO and CPO-SimPO, with CPO's NLL ("BC") term and
AlphaPO's reward shape (``alpha``).

Xu et al. 2024 (arXiv 2401.08417), Meng et al. 2024 (arXiv 2405.14734) and Gupta et al. 2025
(AlphaPO, arXiv 2501.03884); TRL 1.16's
``CPOTrainer`` (experimental) is the reference implementation for the variants, the NLL term and ``alpha``. Inputs are
:class:`preftune.types.PolicyLogps` with ``(B,)`` tensors; the reference sums are not used.
"""

from __future__ import annotations

from typing import Optional

import torch

from preftune.types import LossOutput, PolicyLogps

from .base import (
    Batch,
    Variant,
    check_positive,
    check_smoothing,
    check_weight,
    chosen_nll,
    hinge_term,
    ipo_term,
    loss_output,
    pick_variant,
    prepare,
    sigmoid_term,
)

CPO_VARIANTS: dict[str, Variant] = {
    "sigmoid": Variant(sigmoid_term, True, False),
    "hinge": Variant(hinge_term, False, False),
    "ipo": Variant(ipo_term, False, True),
}


def alpha_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape (Gupta et al. 2025, arXiv 2501.03884): ``r = (1 - p^-alpha) / alpha`` with
    ``p = exp(logps)``, computed as ``-expm1(-alpha * logps) / alpha`` (no overflow of ``p^-alpha``);
    ``alpha = 0`` is the limit ``r = logps`` (CPO / SimPO). ``logps (B,)`` -> ``(B,)``."""
    if not alpha:
        return logps
    return -torch.expm1(-alpha * logps) / alpha


def _add_bc_term(losses: torch.Tensor, b: Batch, cpo_alpha: float, **normalisers: Optional[float]
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``losses + cpo_alpha * nll`` (CPO's BC regulariser, :func:`chosen_nll` with ``normalisers``:
    ``num_pairs_total``, ``nll_normaliser``); nll is None when alpha is 0."""
    if not cpo_alpha:
        return losses, None
    nll = chosen_nll(b.chosen, b.chosen_lengths, **normalisers)
    return losses + cpo_alpha * nll, nll


def cpo_loss(logps: PolicyLogps, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, cpo_alpha: float = 1.0, alpha: float = 0.0,
             num_pairs_total: Optional[float] = None, nll_normaliser: Optional[float] = None) -> LossOutput:
    """Contrastive Preference Optimization (Xu et al. 2024, arXiv 2401.08417).

    ``loss_i = term(pi_c - pi_r) + cpo_alpha * nll_i`` where ``pi_*`` are the summed log-probs for
    ``sigmoid`` (Eq. 3, ``-log sigmoid(beta * (pi_c - pi_r))``, label-smoothed as in
    :func:`sigmoid_term`) and ``hinge``, and the per-token averages for ``ipo`` (as TRL 1.16:
    ``(avg_c - avg_r - 1/(2 beta))**2``). ``nll_i`` is :func:`chosen_nll` (the L_NLL / BC
    regulariser, Sec. 3). Rewards ``beta * pi_*``; ``logps/*`` log ``pi_*``. With ``alpha != 0``
    (AlphaPO's reward shape, TRL's ``CPOConfig.alpha``) ``pi_*`` is replaced by
    :func:`alpha_reward` ``(pi_*, alpha)`` in the term and the rewards (not in ``logps/*``).

    Args:
        logps: ``PolicyLogps`` with ``(B,)`` tensors (reference sums are ignored).
        beta: temperature (> 0); for ``ipo`` the regulariser tau.
        loss_type: one of :data:`CPO_VARIANTS` (``sigmoid``, ``hinge``, ``ipo``).
        label_smoothing: in [0, 0.5); ``sigmoid`` only (TRL warns and ignores it for hinge/ipo,
            here it is an error).
        cpo_alpha: weight of the NLL term (>= 0); 0 disables it (``nll_loss`` logged as 0).
        alpha: AlphaPO's reward shape (any real; 0: the log-prob reward).
        num_pairs_total, nll_normaliser: pairs and chosen completion tokens of the global batch for
            the NLL term (:func:`chosen_nll`); None: this batch's.

    Returns:
        ``LossOutput`` with ``losses (B,)``.

    Raises:
        ValueError: unknown ``loss_type``, ``beta <= 0``, ``cpo_alpha < 0``, label smoothing out of
            range or given to hinge/ipo, or bad ``logps`` (see module doc).
    """
    variant = pick_variant(CPO_VARIANTS, "cpo", loss_type)
    check_positive("beta", beta, "cpo")
    check_weight("cpo_alpha", cpo_alpha, "cpo")
    check_smoothing(f"cpo/{loss_type}", label_smoothing, variant.uses_label_smoothing)
    b = prepare(logps, "cpo")
    chosen, rejected = b.chosen, b.rejected
    if variant.length_normalised:
        chosen, rejected = chosen / b.chosen_lengths, rejected / b.rejected_lengths
    r_c, r_r = alpha_reward(chosen, alpha), alpha_reward(rejected, alpha)
    losses = variant.term(r_c - r_r, beta, label_smoothing)
    losses, nll = _add_bc_term(losses, b, cpo_alpha, num_pairs_total=num_pairs_total, nll_normaliser=nll_normaliser)
    return loss_output(losses, beta * r_c, beta * r_r, chosen, rejected, nll)


def simpo_loss(logps: PolicyLogps, *, beta: float = 2.0, simpo_gamma: float = 0.5,
               label_smoothing: float = 0.0, cpo_alpha: float = 0.0, alpha: float = 0.0,
               num_pairs_total: Optional[float] = None, nll_normaliser: Optional[float] = None) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6), optionally with the CPO NLL term.

    ``loss_i = -(1 - eps) log sigmoid(z_i) - eps log sigmoid(-z_i) + cpo_alpha * nll_i`` with
    ``z_i = beta * (avg_c - avg_r) - simpo_gamma``, ``avg_* = logps_* / lengths_*`` (the
    length-normalised reward, Eq. 4). ``cpo_alpha > 0`` is CPO-SimPO (TRL's CPOTrainer with
    ``loss_type="simpo"`` and ``cpo_alpha``). Rewards ``beta * avg_*``; ``logps/*`` log ``avg_*``.
    Label smoothing is not in the paper; it is TRL's conservative form. ``alpha != 0`` is AlphaPO
    (Gupta et al. 2025, arXiv 2501.03884; TRL's ``loss_type="alphapo"``): ``avg_*`` is replaced by
    :func:`alpha_reward` ``(avg_*, alpha)`` in ``z`` and the rewards (``logps/*`` still log ``avg_*``).

    Args:
        logps: ``PolicyLogps`` with ``(B,)`` tensors.
        beta: reward scale (> 0). simpo_gamma: target reward margin gamma (nats, any sign).
        label_smoothing: in [0, 0.5). cpo_alpha: NLL weight (>= 0). alpha: AlphaPO's reward shape.
        num_pairs_total, nll_normaliser: pairs and chosen completion tokens of the global batch for
            the NLL term (:func:`chosen_nll`); None: this batch's.

    Returns:
        ``LossOutput`` with ``losses (B,)``.

    Raises:
        ValueError: ``beta <= 0``, ``cpo_alpha < 0``, label smoothing out of range, bad ``logps``.
    """
    check_positive("beta", beta, "simpo")
    check_weight("cpo_alpha", cpo_alpha, "simpo")
    check_smoothing("simpo", label_smoothing, True)
    b = prepare(logps, "simpo")
    chosen, rejected = b.chosen / b.chosen_lengths, b.rejected / b.rejected_lengths
    r_c, r_r = alpha_reward(chosen, alpha), alpha_reward(rejected, alpha)
    losses = sigmoid_term(r_c - r_r - simpo_gamma / beta, beta, label_smoothing)
    losses, nll = _add_bc_term(losses, b, cpo_alpha, num_pairs_total=num_pairs_total, nll_normaliser=nll_normaliser)
    return loss_output(losses, beta * r_c, beta * r_r, chosen, rejected, nll)


def cpo_simpo_loss(logps: PolicyLogps, *, beta: float = 2.0, simpo_gamma: float = 0.5,
                   label_smoothing: float = 0.0, cpo_alpha: float = 1.0, alpha: float = 0.0,
                   num_pairs_total: Optional[float] = None, nll_normaliser: Optional[float] = None) -> LossOutput:
    """CPO-SimPO: :func:`simpo_loss` plus ``cpo_alpha`` (default 1.0) x the chosen NLL.

    Same formula, shapes and errors as :func:`simpo_loss`; only the default ``cpo_alpha`` differs.
    """
    return simpo_loss(logps, beta=beta, simpo_gamma=simpo_gamma, label_smoothing=label_smoothing,
                      cpo_alpha=cpo_alpha, alpha=alpha, num_pairs_total=num_pairs_total, nll_normaliser=nll_normaliser)

