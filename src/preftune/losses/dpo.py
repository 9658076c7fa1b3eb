"""The DPO family: DPO and every TRL 1.16 ``DPOConfig.loss_type`` over per-sequence log-probs
(:data:`DPO_VARIANTS`, the terms in :mod:`~preftune.losses.dpo_terms`), their weighted mixtures
(MPO), f-DPO's divergences and RPO's NLL term (Rafailov et al. 2023, arXiv 2305.18290; TRL 1.16's
``DPOTrainer`` is the reference). Inputs are :class:`preftune.types.PolicyLogps` ``(B,)`` tensors
*with* the reference sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

from preftune.types import LossOutput, PolicyLogps

from . import base
from .dpo_terms import DPO_TERMS, F_DIVERGENCES, DPOVariant, Pairs, f_scores

#: ``--dpo_loss_type`` / ``DPOConfig.loss_type`` name -> :class:`~preftune.losses.dpo_terms.DPOVariant`.
DPO_VARIANTS: dict[str, DPOVariant] = DPO_TERMS

LossTypes = Union[str, Sequence[str]]


def loss_type_list(loss_type: LossTypes) -> list[str]:
    """``"sigmoid"`` -> ``["sigmoid"]``; a list or tuple of names as a list."""
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def dpo_options_problem(loss_type: LossTypes, loss_weights: Optional[Sequence[float]] = None,
                        label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                        discopop_tau: float = 0.05, rpo_alpha: Optional[float] = None) -> Optional[str]:
    """What is wrong with a DPO configuration, as one line naming the flags, or None when it is valid.

    Checked (as TRL 1.16 does, plus preftune's label-smoothing rule): the names are
    :data:`DPO_VARIANTS`, at least one; ``loss_weights`` has one finite weight per name;
    ``f_divergence_type`` is one of :data:`~preftune.losses.dpo_terms.F_DIVERGENCES` and, when not
    ``reverse_kl``, every name has an f-divergence form; ``label_smoothing`` > 0 for ``exo_pair``
    and, when non-zero, used by at least one name; ``discopop_tau`` > 0 with ``discopop``; the NLL
    weight given once (``rpo_alpha`` or an ``sft`` term).
    """
    types = loss_type_list(loss_type)
    unknown = [t for t in types if t not in DPO_VARIANTS]
    if not types or unknown:
        shown = repr(unknown[0]) if len(types) == 1 else types
        return f"--dpo_loss_type {shown} is not valid; choose one of: {', '.join(DPO_VARIANTS)}"
    if loss_weights is not None:
        if len(loss_weights) != len(types):
            return (f"--loss_weights has {len(loss_weights)} entries for {len(types)} loss types {types}; "
                    "give one weight per --dpo_loss_type")
        if not all(math.isfinite(float(w)) for w in loss_weights):
            return f"--loss_weights must be finite numbers, got {list(loss_weights)}"
    if f_divergence_type not in F_DIVERGENCES:
        return f"--f_divergence_type {f_divergence_type!r} is not valid; choose one of: {', '.join(F_DIVERGENCES)}"
    if f_divergence_type != "reverse_kl":
        refused = [t for t in types if not DPO_VARIANTS[t].f_divergence]
        if refused:
            allowed = ", ".join(k for k, v in DPO_VARIANTS.items() if v.f_divergence)
            return (f"--f_divergence_type {f_divergence_type} has no form for --dpo_loss_type {', '.join(refused)} "
                    f"(only for {allowed}); use reverse_kl with them")
    if "exo_pair" in types and not label_smoothing > 0:
        return "--dpo_loss_type exo_pair needs --label_smoothing > 0 (the EXO paper uses 1e-3)"
    if "discopop" in types and not discopop_tau > 0:
        return f"--discopop_tau must be > 0, got {discopop_tau}"
    if "sft" in types and rpo_alpha is not None:
        return "give the NLL weight once: --rpo_alpha or an sft entry in --dpo_loss_type, not both"
    return None


def dpo_loss(logps: PolicyLogps, *, beta: float = 0.1, loss_type: LossTypes = "sigmoid",
             label_smoothing: float = 0.0, rpo_alpha: Optional[float] = None,
             loss_weights: Optional[Sequence[float]] = None, f_divergence_type: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05,
             num_pairs_total: Optional[float] = None, nll_normaliser: Optional[float] = None) -> LossOutput:
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7), its variants
    and their weighted sums.

    With log-ratios ``h_* = pi_* - ref_*`` (summed log-probs) and the f-DPO scores ``s_* = g(h_*)``
    (:func:`~preftune.losses.dpo_terms.f_scores`; ``s = h`` for ``reverse_kl``, the default):

    ``loss_i = sum_k w_k term_k,i + rpo_alpha * nll_i``

    over the names ``k`` of ``loss_type`` (one name, or a list: a mixture such as MPO's
    ``[sigmoid, bco_pair, sft]`` with ``[0.8, 0.2, 1.0]``) with weights ``loss_weights`` (default 1
    each); each term's formula and paper is its function's docstring in
    :mod:`~preftune.losses.dpo_terms` (sigmoid, hinge, ipo, robust, exo_pair, nca_pair, bco_pair,
    sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm). The mean is TRL
    1.16's ``sum_k w_k mean_i term_k,i``; for ``aot`` / ``aot_unpaired`` entry ``i`` is an order
    statistic, not pair ``i``. ``sft`` is :func:`chosen_nll` (the batch token mean of the chosen NLL).

    Label smoothing ``eps`` applies to the names that take it (sigmoid: conservative DPO, which TRL
    1.16 ignores, so TRL parity needs ``eps = 0`` there; robust; exo_pair, which needs ``eps > 0``;
    aot; aot_unpaired); non-zero with none of them is an error.

    ``rpo_alpha`` adds ``rpo_alpha * nll_i`` (RPO, Pang et al. 2024, arXiv 2404.19733), the same as an
    ``sft`` entry with weight ``rpo_alpha`` (TRL 1.16's form of RPO); give one or the other.

    Rewards ``beta * h_*`` (summed, every variant and divergence, as TRL); ``logps/*`` log the summed
    policy log-probs; ``nll_loss`` the unweighted NLL when an NLL term is present, else 0.

    Args:
        logps: ``PolicyLogps`` with ``(B,)`` tensors including ``ref_chosen_logps`` and
            ``ref_rejected_logps``.
        beta: temperature (> 0); tau for ``ipo``.
        loss_type: a name of :data:`DPO_VARIANTS` or a sequence of them.
        label_smoothing: in [0, 0.5).
        rpo_alpha: NLL weight (>= 0) or ``None``.
        loss_weights: one weight per name of ``loss_type`` (default: 1 each).
        f_divergence_type, f_alpha_divergence_coef: f-DPO (Wang et al. 2024, arXiv 2309.16240);
            not ``reverse_kl`` only with the names that have an f-divergence form.
        discopop_tau: DiscoPOP's temperature (> 0).
        num_pairs_total, nll_normaliser: pairs and chosen completion tokens of the global batch for
            the NLL (:func:`chosen_nll`); None: this batch's.

    Returns:
        ``LossOutput`` with ``losses (B,)``.

    Raises:
        ValueError: an unknown name, a configuration :func:`dpo_options_problem` refuses, missing
            reference sums, ``beta <= 0``, ``rpo_alpha < 0``, label smoothing out of range or given
            to names that do not use it, bad ``logps``.
    """
    types = loss_type_list(loss_type)
    if len(types) == 1 and types[0] not in DPO_VARIANTS:
        base.pick_variant(DPO_VARIANTS, "dpo", types[0])  # the historical message
    problem = dpo_options_problem(types, loss_weights, label_smoothing, f_divergence_type, discopop_tau, rpo_alpha)
    if problem is not None:
        raise ValueError(f"{base.WHERE}: {problem}")
    base.check_positive("beta", beta, "dpo")
    if rpo_alpha is not None:
        base.check_weight("rpo_alpha", rpo_alpha, "dpo")
    variants = [DPO_VARIANTS[t] for t in types]
    base.check_smoothing(f"dpo/{'+'.join(types)}", label_smoothing, any(v.uses_label_smoothing for v in variants))
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    b = base.prepare(logps, "dpo", need_ref=True)
    h_c, h_r = b.chosen - b.ref_chosen, b.rejected - b.ref_rejected
    nll_weight = rpo_alpha if rpo_alpha else 0.0
    nll = base.chosen_nll(b.chosen, b.chosen_lengths, num_pairs_total=num_pairs_total,
                          nll_normaliser=nll_normaliser) if nll_weight or "sft" in types else None
    pairs = Pairs(b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, b.chosen_lengths, b.rejected_lengths, h_c, h_r,
                  f_scores(h_c, f_divergence_type, f_alpha_divergence_coef),
                  f_scores(h_r, f_divergence_type, f_alpha_divergence_coef), nll)
    losses = None
    for variant, weight in zip(variants, weights):
        term = variant.term(pairs, beta, label_smoothing, discopop_tau)
        term = term if weight == 1.0 else weight * term
        losses = term if losses is None else losses + term
    if nll_weight:
        losses = losses + nll_weight * nll
    return base.loss_output(losses, beta * h_c, beta * h_r, b.chosen, b.rejected, nll)
