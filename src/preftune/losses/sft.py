"""Supervised fine-tuning on the chosen completions of preference pairs (the NLL alone), over
:class:`preftune.types.PolicyLogps` ``(B,)`` tensors."""

from __future__ import annotations

from typing import Optional

from preftune.types import LossOutput, PolicyLogps

from .base import check_smoothing, chosen_nll, loss_output, prepare


def sft_loss(logps: PolicyLogps, *, label_smoothing: float = 0.0, num_pairs_total: Optional[float] = None,
             nll_normaliser: Optional[float] = None) -> LossOutput:
    """Supervised fine-tuning on the chosen completions: ``loss_i = nll_i`` (:func:`chosen_nll`).

    The mean is the token-mean NLL of all chosen tokens (TRL's SFT / DPO ``"sft"`` loss); the
    rejected completions get no gradient. Rewards are the per-token averaged log-probs
    ``logps_* / lengths_*`` (no beta), so ``rewards/accuracies`` still says how often the model
    prefers the chosen completion. ``logps/*`` log the summed log-probs; ``nll_loss`` the NLL.
    ``num_pairs_total`` / ``nll_normaliser``: the global batch's counts (:func:`chosen_nll`).

    Raises:
        ValueError: ``label_smoothing != 0`` or bad ``logps``.
    """
    check_smoothing("sft", label_smoothing, False)
    b = prepare(logps, "sft")
    nll = chosen_nll(b.chosen, b.chosen_lengths, num_pairs_total=num_pairs_total, nll_normaliser=nll_normaliser)
    return loss_output(nll, b.chosen / b.chosen_lengths, b.rejected / b.rejected_lengths,
                   b.chosen, b.rejected, nll)

