"""The DPO family: DPO (sigmoid, hinge, IPO, robust) against a reference policy, with RPO's NLL
term (Rafailov et al. 2023, arXiv 2305.18290; TRL 1.16's ``DPOTrainer`` is the reference for the
variants). Inputs are :class:`preftune.types.PolicyLogps` ``(B,)`` tensors *with* the reference sums.
"""

from __future__ import annotations

from typing import Optional

from preftune.types import LossOutput, PolicyLogps

from . import base

DPO_VARIANTS: dict[str, base.Variant] = {
    "sigmoid": base.Variant(base.sigmoid_term, True, False),
    "hinge": base.Variant(base.hinge_term, False, False),
    "ipo": base.Variant(base.ipo_term, False, True),
    "robust": base.Variant(base.robust_term, True, False),
}


def dpo_loss(logps: PolicyLogps, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, rpo_alpha: Optional[float] = None,
             num_pairs_total: Optional[float] = None, nll_normaliser: Optional[float] = None) -> LossOutput:
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7) and variants.

    With log-ratios ``h_* = pi_* - ref_*`` (summed log-probs) and margin ``m = h_c - h_r``:

    * ``sigmoid``: ``-(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)`` (Eq. 7; ``eps > 0``
      is conservative DPO, Mitchell 2023). TRL 1.16 ignores ``label_smoothing`` for sigmoid, so
      parity with TRL holds for ``eps = 0`` only.
    * ``hinge``: ``max(0, 1 - beta m)``.
    * ``ipo``: ``(m' - 1/(2 beta))**2`` (Azar et al., arXiv 2310.12036, Eq. 17) on the *per-token
      averaged* margin ``m' = h_c / len_c - h_r / len_r``, as TRL 1.16 does (not in the paper).
    * ``robust``: :func:`robust_term` (arXiv 2403.00409) with flip rate ``eps``.

    ``rpo_alpha`` adds ``rpo_alpha * nll_i`` (RPO, Pang et al. 2024, arXiv 2404.19733); in TRL 1.16
    that is ``loss_type=[<type>, "sft"]`` with ``loss_weights=[1, rpo_alpha]``, the same batch
    token-mean NLL as :func:`chosen_nll`. The paper instead weights the DPO term by alpha and
    normalises the NLL per sequence (over prompt and completion); TRL's form is followed here. Rewards ``beta * h_*`` (summed, every variant);
    ``logps/*`` log the summed policy log-probs.

    Args:
        logps: ``PolicyLogps`` with ``(B,)`` tensors including ``ref_chosen_logps`` and
            ``ref_rejected_logps``.
        beta: temperature (> 0); tau for ``ipo``.
        loss_type: one of :data:`DPO_VARIANTS`.
        label_smoothing: in [0, 0.5); ``sigmoid`` and ``robust`` only.
        rpo_alpha: NLL weight (>= 0) or ``None`` (no NLL term, ``nll_loss`` logged as 0).
        num_pairs_total, nll_normaliser: pairs and chosen completion tokens of the global batch for
            the NLL term (:func:`chosen_nll`); None: this batch's.

    Returns:
        ``LossOutput`` with ``losses (B,)``.

    Raises:
        ValueError: unknown ``loss_type``, missing reference sums, ``beta <= 0``, ``rpo_alpha < 0``,
            label smoothing out of range or given to hinge/ipo, bad ``logps``.
    """
    variant = base.pick_variant(DPO_VARIANTS, "dpo", loss_type)
    base.check_positive("beta", beta, "dpo")
    if rpo_alpha is not None:
        base.check_weight("rpo_alpha", rpo_alpha, "dpo")
    base.check_smoothing(f"dpo/{loss_type}", label_smoothing, variant.uses_label_smoothing)
    b = base.prepare(logps, "dpo", need_ref=True)
    chosen_ratio, rejected_ratio = b.chosen - b.ref_chosen, b.rejected - b.ref_rejected
    if variant.length_normalised:
        margin = chosen_ratio / b.chosen_lengths - rejected_ratio / b.rejected_lengths
    else:
        margin = chosen_ratio - rejected_ratio
    losses = variant.term(margin, beta, label_smoothing)
    nll = base.chosen_nll(b.chosen, b.chosen_lengths, num_pairs_total=num_pairs_total,
                     nll_normaliser=nll_normaliser) if rpo_alpha else None
    if nll is not None:
        losses = losses + rpo_alpha * nll
    return base.loss_output(losses, beta * chosen_ratio, beta * rejected_ratio, b.chosen, b.rejected, nll)

