"""The DPO family's per-pair terms (every TRL 1.16 ``DPOConfig.loss_type`` that is a function of
per-sequence log-probs) and f-DPO's score transforms; :func:`preftune.losses.dpo.dpo_loss` sums them.

Notation, all ``(B,)`` tensors: ``pi_c, pi_r`` summed policy log-probs of the chosen / rejected
completions, ``ref_c, ref_r`` the same under the reference, ``len_c, len_r`` token counts, log-ratios
``h_c = pi_c - ref_c``, ``h_r = pi_r - ref_r``; ``s_c = g(h_c)``, ``s_r = g(h_r)`` the scores after
the f-divergence transform ``g`` (:func:`f_scores`; ``g(h) = h`` for reverse KL, standard DPO) and
``d = s_c - s_r``; ``beta`` the temperature, ``eps`` the label smoothing, ``tau`` DiscoPOP's
temperature, ``sig`` the logistic function and ``ls = log sig``. Each term returns ``(B,)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .base import hinge_term, robust_term, sigmoid_term


@dataclass(frozen=True)
class Pairs:
    """What a DPO term reads, all ``(B,)`` in the compute dtype: policy sums ``pi_c, pi_r``,
    reference sums ``ref_c, ref_r``, token counts ``len_c, len_r``, log-ratios ``h_c, h_r``, f-scores
    ``s_c, s_r`` and the spread chosen NLL ``nll`` (:func:`~preftune.losses.base.chosen_nll`; only
    when an ``sft`` term is asked for)."""

    pi_c: torch.Tensor
    pi_r: torch.Tensor
    ref_c: torch.Tensor
    ref_r: torch.Tensor
    len_c: torch.Tensor
    len_r: torch.Tensor
    h_c: torch.Tensor
    h_r: torch.Tensor
    s_c: torch.Tensor
    s_r: torch.Tensor
    nll: Optional[torch.Tensor] = None


Term = Callable[[Pairs, float, float, float], torch.Tensor]


@dataclass(frozen=True)
class DPOVariant:
    """One DPO ``loss_type``: its term ``fn(pairs, beta, eps, tau) -> (B,)``, whether it takes label
    smoothing (``uses_label_smoothing``; ``requires_label_smoothing``: eps must be > 0), and whether
    it has an f-divergence form (built on ``d = s_c - s_r`` only; TRL 1.16's list)."""

    term: Term
    uses_label_smoothing: bool
    f_divergence: bool
    requires_label_smoothing: bool = False


# ---- f-DPO ------------------------------------------------------------------------------------

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_EXP_MAX = 80.0  # exp(80) is finite in float32


def f_scores(h: torch.Tensor, f_divergence_type: str, f_alpha_divergence_coef: float) -> torch.Tensor:
    """f-DPO's score ``g(h) = f'(exp h)`` of a log-ratio ``h (B,)`` (Wang et al. 2024, "Beyond Reverse
    KL", arXiv 2309.16240: ``beta f'(pi / ref)`` replaces DPO's ``beta log(pi / ref)``):

    * ``reverse_kl``: ``h`` (``f'(u) = log u + 1``, the constant cancels in ``s_c - s_r``: DPO);
    * ``forward_kl``: ``1 - exp(-h)`` (``f'(u) = 1 - 1/u``);
    * ``js_divergence``: ``log 2 + log sig(h)`` (``f'(u) = log(2u / (1 + u))``);
    * ``alpha_divergence`` with ``a = f_alpha_divergence_coef``: ``(exp((a - 1) h) - 1) / (a - 1)``,
      the paper's ``(1 - u^-alpha) / alpha`` with ``alpha = 1 - a`` (TRL 1.16's parameterisation);
      ``(a - 1) h`` is clamped at 80 (no overflow) and ``|a - 1| < 1e-6`` is the ``reverse_kl`` limit.

    Raises:
        ValueError: an unknown ``f_divergence_type``.
    """
    if f_divergence_type == "reverse_kl":
        return h
    if f_divergence_type == "forward_kl":
        return 1.0 - torch.exp(-h)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(h)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef - 1.0
        if abs(a) < 1e-6:
            return h
        return torch.expm1(torch.clamp(a * h, max=_EXP_MAX)) / a
    raise ValueError(f"preftune.losses: unknown f_divergence_type {f_divergence_type!r}; "
                     f"valid: {', '.join(F_DIVERGENCES)}")


# ---- the terms ----------------------------------------------------------------------------------


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7): ``-(1-eps) ls(beta d) - eps ls(-beta d)``
    (``eps > 0``: conservative DPO; TRL 1.16 ignores eps here)."""
    return sigmoid_term(p.s_c - p.s_r, beta, eps)


def hinge(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """SLiC hinge (Zhao et al. 2023, arXiv 2305.10425, with DPO's ratios): ``max(0, 1 - beta d)``."""
    return hinge_term(p.s_c - p.s_r, beta, eps)


def ipo(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17, tau = beta) on per-token averaged scores, as
    TRL 1.16: ``(s_c / len_c - s_r / len_r - 1 / (2 beta))**2``."""
    return (p.s_c / p.len_c - p.s_r / p.len_r - 1.0 / (2.0 * beta)) ** 2


def exo_pair(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, arXiv 2402.00856, Eq. 16, K = 2): the reverse KL from
    ``(sig(z), sig(-z))``, ``z = beta d``, to the smoothed labels ``(1 - eps, eps)``:
    ``sig(z) (ls(z) - log(1 - eps)) + sig(-z) (ls(-z) - log eps)``; eps must be > 0 (1e-3 in the paper)."""
    z = beta * (p.s_c - p.s_r)
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def nca_pair(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """NCA (Chen et al. 2024, arXiv 2402.05369, the pairwise NCA loss):
    ``-ls(beta h_c) - ls(-beta h_c) / 2 - ls(-beta h_r) / 2``."""
    return (-F.logsigmoid(beta * p.h_c) - 0.5 * F.logsigmoid(-beta * p.h_c)
            - 0.5 * F.logsigmoid(-beta * p.h_r))


def robust(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """rDPO (Chowdhury et al. 2024, arXiv 2403.00409) with flip rate eps:
    ``[-(1-eps) ls(beta d) + eps ls(-beta d)] / (1 - 2 eps)``."""
    return robust_term(p.s_c - p.s_r, beta, eps)


def bco_pair(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024, arXiv 2404.04656, with the reward shift delta = 0):
    ``-ls(beta h_c) - ls(-beta h_r)``. TRL 1.16 uses no shift (no running mean of the rewards)."""
    return -F.logsigmoid(beta * p.h_c) - F.logsigmoid(-beta * p.h_r)


def sppo_hard(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 with P = 1 for the
    chosen and 0 for the rejected): ``(h_c - 1/(2 beta))**2 + (h_r + 1/(2 beta))**2``."""
    half = 0.5 / beta
    return (p.h_c - half) ** 2 + (p.h_r + half) ** 2


def aot(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882, with the logistic loss): the sorted
    policy margins ``sort(pi_c - pi_r)`` against the sorted reference margins ``sort(ref_c - ref_r)``,
    ``delta = sort(pi_c - pi_r) - sort(ref_c - ref_r)``, then ``-(1-eps) ls(beta delta) - eps
    ls(-beta delta)``. Entry ``i`` is the ``i``-th order statistic, not pair ``i`` (the mean is the loss)."""
    delta = torch.sort(p.pi_c - p.pi_r).values - torch.sort(p.ref_c - p.ref_r).values
    return _smoothed(beta * delta, eps)


def aot_unpaired(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """AOT, unpaired (arXiv 2406.05882, with the logistic loss): ``delta = sort(h_c) - sort(h_r)``,
    then ``-(1-eps) ls(beta delta) - eps ls(-beta delta)`` (order statistics, as :func:`aot`)."""
    delta = torch.sort(p.h_c).values - torch.sort(p.h_r).values
    return _smoothed(beta * delta, eps)


def apo_zero(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7): ``1 - sig(beta h_c) + sig(beta h_r)``
    (chosen better than the model's outputs: raise chosen, lower rejected)."""
    return 1.0 - torch.sigmoid(beta * p.h_c) + torch.sigmoid(beta * p.h_r)


def apo_down(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """APO-down (arXiv 2408.06266, Eq. 8): ``sig(beta h_c) + 1 - sig(beta (h_c - h_r))`` (chosen worse
    than the model's outputs: lower both, rejected more)."""
    return torch.sigmoid(beta * p.h_c) + 1.0 - torch.sigmoid(beta * (p.h_c - p.h_r))


def discopop(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, arXiv 2406.08414, Eq. 5), ``z = beta d``,
    ``w = sig(z / tau)``: ``(1 - w) (-ls(z)) + w exp(-z)``."""
    z = beta * (p.s_c - p.s_r)
    w = torch.sigmoid(z / tau)
    return (1.0 - w) * -F.logsigmoid(z) + w * torch.exp(-z)


def sft(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """The chosen NLL, spread so that its mean is the batch token mean (:func:`chosen_nll`)."""
    assert p.nll is not None
    return p.nll


def sigmoid_norm(p: Pairs, beta: float, eps: float, tau: float) -> torch.Tensor:
    """Length-normalised DPO (TRL 1.16's ``sigmoid_norm``; DPO's Eq. 7, on per-token averaged scores,
    the length normalisation of SimPO, arXiv 2405.14734, Eq. 4): ``-ls(beta (s_c / len_c - s_r / len_r))``."""
    return -F.logsigmoid(beta * (p.s_c / p.len_c - p.s_r / p.len_r))


#: DPO ``loss_type`` -> :class:`DPOVariant`, in ``--help`` order (preftune's first four, then TRL 1.16's order).
DPO_TERMS: dict[str, DPOVariant] = {
    "sigmoid": DPOVariant(sigmoid, True, True),
    "hinge": DPOVariant(hinge, False, True),
    "ipo": DPOVariant(ipo, False, True),
    "robust": DPOVariant(robust, True, True),
    "exo_pair": DPOVariant(exo_pair, True, True, requires_label_smoothing=True),
    "nca_pair": DPOVariant(nca_pair, False, False),
    "bco_pair": DPOVariant(bco_pair, False, False),
    "sppo_hard": DPOVariant(sppo_hard, False, False),
    "aot": DPOVariant(aot, True, False),
    "aot_unpaired": DPOVariant(aot_unpaired, True, False),
    "apo_zero": DPOVariant(apo_zero, False, False),
    "apo_down": DPOVariant(apo_down, False, False),
    "discopop": DPOVariant(discopop, False, True),
    "sft": DPOVariant(sft, False, True),
    "sigmoid_norm": DPOVariant(sigmoid_norm, False, True),
}
