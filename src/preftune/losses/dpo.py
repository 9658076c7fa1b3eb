"""The DPO family: DPO and every TRL 1.16 ``DPOConfig.loss_type`` over per-sequence log-probs
(:data:`DPO_VARIANTS`, the terms in :mod:`~preftune.losses.dpo_terms`), their weighted mixtures
(MPO), f-DPO's divergences, RPO's NLL term, LD-DPO's length-desensitised sums and WPO's pair weights
(Rafailov et al. 2023, arXiv 2305.18290; TRL 1.16's ``DPOTrainer`` is the reference). Inputs are
:class:`preftune.types.PolicyLogps` ``(B,)`` tensors *with* the reference sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch

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
                        discopop_tau: float = 0.05, rpo_alpha: Optional[float] = None,
                        ld_alpha: Optional[float] = None, use_weighting: bool = False) -> Optional[str]:
    """What is wrong with a DPO configuration, as one line naming the flags, or None when it is valid.

    Checked (as TRL 1.16 does, plus preftune's label-smoothing rule): the names are
    :data:`DPO_VARIANTS`, at least one; ``loss_weights`` has one finite weight per name;
    ``f_divergence_type`` is one of :data:`~preftune.losses.dpo_terms.F_DIVERGENCES` and, when not
    ``reverse_kl``, every name has an f-divergence form; ``label_smoothing`` > 0 for ``exo_pair``
    and, when non-zero, used by at least one name; ``discopop_tau`` > 0 with ``discopop``; the NLL
    weight given once (``rpo_alpha`` or an ``sft`` term); ``ld_alpha`` in ``[0, 1]``; ``use_weighting``
    (WPO) neither with ``aot`` / ``aot_unpaired`` (they sort the pairs: TRL 1.16 refuses it) nor with an
    NLL term (``sft`` / ``rpo_alpha``: TRL 1.16 fails on a weighted ``sft`` term).
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
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        return f"--ld_alpha must be in [0, 1] (1: plain sums, 0: the tail beyond the shared length masked), got {ld_alpha}"
    if use_weighting:
        sorted_types = [t for t in types if t in ("aot", "aot_unpaired")]
        if sorted_types:
            return (f"--use_weighting (WPO) does not apply to --dpo_loss_type {', '.join(sorted_types)}: they sort "
                    "the pairs, so per-pair weights would be misaligned (TRL 1.16 refuses it too)")
        if "sft" in types or rpo_alpha:
            return ("--use_weighting (WPO) weighs preference pairs, not the NLL term: drop sft from --dpo_loss_type "
                    "and --rpo_alpha, or --use_weighting")
    return None


#: TR-DPO's defaults (TRL 1.16's ``DPOConfig``): ``ref_model_mixup_alpha``, ``ref_model_sync_steps``.
REF_MODEL_MIXUP_ALPHA = 0.6
REF_MODEL_SYNC_STEPS = 512


def ref_sync_problem(args, needs_reference: bool) -> Optional[str]:
    """What is wrong with the TR-DPO fields of ``args`` (a LossArguments, duck-typed: ``sync_ref_model``,
    ``ref_model_mixup_alpha``, ``ref_model_sync_steps``, ``loss``) as one line, or None: the reference
    updated for a loss without one (``needs_reference`` False), ``alpha`` outside ``[0, 1]``, steps < 1,
    or the two parameters given without ``--sync_ref_model`` (Gorbatovski et al. 2024, arXiv 2404.09656)."""
    alpha = getattr(args, "ref_model_mixup_alpha", REF_MODEL_MIXUP_ALPHA)
    steps = getattr(args, "ref_model_sync_steps", REF_MODEL_SYNC_STEPS)
    if not getattr(args, "sync_ref_model", False):
        if alpha != REF_MODEL_MIXUP_ALPHA or steps != REF_MODEL_SYNC_STEPS:
            return "--ref_model_mixup_alpha / --ref_model_sync_steps apply with --sync_ref_model (TR-DPO) only"
        return None
    if not needs_reference:
        return f"--sync_ref_model (TR-DPO) applies to the losses with a reference policy, not --loss {args.loss!r}"
    if not 0.0 <= alpha <= 1.0:
        return f"--ref_model_mixup_alpha must be in [0, 1], got {alpha}"
    if int(steps) != steps or steps < 1:
        return f"--ref_model_sync_steps must be an integer >= 1, got {steps}"
    return None


def dpo_loss(logps: PolicyLogps, *, beta: float = 0.1, loss_type: LossTypes = "sigmoid",
             label_smoothing: float = 0.0, rpo_alpha: Optional[float] = None,
             loss_weights: Optional[Sequence[float]] = None, f_divergence_type: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05, ld_alpha: Optional[float] = None,
             use_weighting: bool = False, num_pairs_total: Optional[float] = None,
             nll_normaliser: Optional[float] = None) -> LossOutput:
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

    LD-DPO (``ld_alpha``; Liu et al. 2024, arXiv 2409.06411, Eq. 8): the engine gives the policy and
    reference sums as ``shared + ld_alpha * tail`` (:class:`PolicyLogps` records ``ld_alpha``, checked
    here), so every term, reward and ``logps/*`` uses them, as TRL 1.16; the NLL uses the plain chosen
    sums (``chosen_plain_logps``), the token counts stay the plain ones.

    WPO (``use_weighting``; Zhou et al. 2024, arXiv 2406.11827, Eq. 2 as TRL 1.16): each pair's loss
    is multiplied by ``w_c * w_r``, ``w = exp(a / len)`` with ``a`` the sequence's sum of
    ``log p_t - log sum_v p_v^2`` (``*_aligned_logps``, no gradient).

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
        ld_alpha: LD-DPO's weight of the tokens beyond the shared length (in [0, 1]) or None.
        use_weighting: WPO's pair weights (needs ``*_aligned_logps``).
        num_pairs_total, nll_normaliser: pairs and chosen completion tokens of the global batch for
            the NLL (:func:`chosen_nll`); None: this batch's.

    Returns:
        ``LossOutput`` with ``losses (B,)``.

    Raises:
        ValueError: an unknown name, a configuration :func:`dpo_options_problem` refuses, missing
            reference sums, log-probs not summed with ``ld_alpha``, missing aligned sums with ``use_weighting``, ``beta <= 0``, ``rpo_alpha < 0``, label smoothing out of range or given
            to names that do not use it, bad ``logps``.
    """
    types = loss_type_list(loss_type)
    if len(types) == 1 and types[0] not in DPO_VARIANTS:
        base.pick_variant(DPO_VARIANTS, "dpo", types[0])  # the historical message
    problem = dpo_options_problem(types, loss_weights, label_smoothing, f_divergence_type, discopop_tau, rpo_alpha,
                                  ld_alpha, use_weighting)
    if problem is not None:
        raise ValueError(f"{base.WHERE}: {problem}")
    if logps.ld_alpha != ld_alpha:
        raise ValueError(f"{base.WHERE}: --ld_alpha {ld_alpha} but the log-probs were summed with ld_alpha="
                         f"{logps.ld_alpha} (preftune.engine.forward.configure_sequence_outputs sets the engine's)")
    if use_weighting and (logps.chosen_aligned_logps is None or logps.rejected_aligned_logps is None):
        raise ValueError(f"{base.WHERE}: --use_weighting needs PolicyLogps.chosen_aligned_logps / "
                         "rejected_aligned_logps (preftune.engine.forward.configure_sequence_outputs(aligned_logps=True))")
    base.check_positive("beta", beta, "dpo")
    if rpo_alpha is not None:
        base.check_weight("rpo_alpha", rpo_alpha, "dpo")
    variants = [DPO_VARIANTS[t] for t in types]
    base.check_smoothing(f"dpo/{'+'.join(types)}", label_smoothing, any(v.uses_label_smoothing for v in variants))
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    b = base.prepare(logps, "dpo", need_ref=True)
    h_c, h_r = b.chosen - b.ref_chosen, b.rejected - b.ref_rejected
    nll_weight = rpo_alpha if rpo_alpha else 0.0
    plain = b.chosen if logps.chosen_plain_logps is None else logps.chosen_plain_logps.to(b.chosen.dtype)
    nll = base.chosen_nll(plain, b.chosen_lengths, num_pairs_total=num_pairs_total,
                          nll_normaliser=nll_normaliser) if nll_weight or "sft" in types else None
    pairs = Pairs(b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, b.chosen_lengths, b.rejected_lengths, h_c, h_r,
                  f_scores(h_c, f_divergence_type, f_alpha_divergence_coef),
                  f_scores(h_r, f_divergence_type, f_alpha_divergence_coef), nll)
    losses = None
    for variant, weight in zip(variants, weights):
        term = variant.term(pairs, beta, label_smoothing, discopop_tau)
        term = term if weight == 1.0 else weight * term
        losses = term if losses is None else losses + term
    if use_weighting:  # WPO: TRL 1.16 weighs each term; the weight is common to all of them
        w_c = torch.exp(logps.chosen_aligned_logps.detach().to(b.chosen.dtype) / b.chosen_lengths.clamp_min(1))
        w_r = torch.exp(logps.rejected_aligned_logps.detach().to(b.chosen.dtype) / b.rejected_lengths.clamp_min(1))
        losses = losses * (w_c * w_r)
    if nll_weight:
        losses = losses + nll_weight * nll
    return base.loss_output(losses, beta * h_c, beta * h_r, b.chosen, b.rejected, nll)
