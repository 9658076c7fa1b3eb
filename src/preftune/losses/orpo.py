"""ORPO: odds-ratio preference optimisation without a reference model (Hong et al. 2024,
arXiv 2403.07691), over :class:`preftune.types.PolicyLogps` ``(B,)`` tensors."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from preftune.types import LossOutput, PolicyLogps

from .base import WHERE, check_positive, check_smoothing, chosen_nll, loss_output, prepare


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Elementwise ``log(1 - exp(x))`` for ``x < 0`` (any shape), stable on both sides of ``-log 2``.

    ``log1p(-exp(x))`` below ``-log 2``, ``log(-expm1(x))`` above (Maechler 2012, "Accurately
    computing log(1 - exp(-|a|))"). ``x = 0`` gives ``-inf``; ``x > 0`` gives NaN.
    """
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(logps: PolicyLogps, *, beta: float = 0.1, label_smoothing: float = 0.0,
              nll_logps: Optional[torch.Tensor] = None,
              nll_lengths: Optional[torch.Tensor] = None) -> LossOutput:
    """Odds-Ratio Preference Optimization (Hong et al. 2024, arXiv 2403.07691, Eqs. 4, 6, 7).

    With ``a_* = logps_* / lengths_*`` (per-token averaged log-probs, the paper's log P(y|x)):
    ``log_odds_i = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r)))`` and
    ``loss_i = nll_i - beta * log sigmoid(log_odds_i)`` (``beta`` is lambda). The mean over the
    batch equals TRL's ``nll - mean(beta * log sigmoid(log_odds))``. Rewards ``beta * a_*``;
    metrics as TRL names them: ``log_odds_ratio`` = mean ``log sigmoid(log_odds)``,
    ``log_odds_chosen`` = mean ``log_odds``; ``logps/*`` log ``a_*``.

    NLL term (the paper's Eq. 2 and 6): ``nll_i = -logps_c / lengths_c``, the per-token mean NLL
    of each chosen *response* given its prompt, averaged over the examples. TRL 1.16 differs
    twice, on purpose or not: its NLL covers the *prompt and* the chosen completion (all
    attended tokens but the first), and it is a token-mean over the whole batch. preftune
    follows the paper (and never computes prompt-position logits). Pass ``nll_logps`` /
    ``nll_lengths`` ``(B,)`` (summed log-probs and token counts over prompt + completion) to
    reproduce TRL's value exactly: that path uses TRL's batch token-mean (:func:`chosen_nll`).

    An average log-prob of exactly 0 (probability 1) makes ``log_odds`` infinite, as in TRL.

    Args:
        logps: ``PolicyLogps`` with ``(B,)`` tensors. beta: lambda (> 0).
        label_smoothing: must be 0 (ORPO has none). nll_logps, nll_lengths: see above.

    Returns:
        ``LossOutput`` with ``losses (B,)`` and extra metrics ``log_odds_ratio``, ``log_odds_chosen``.

    Raises:
        ValueError: ``beta <= 0``, ``label_smoothing != 0``, only one of ``nll_logps`` /
            ``nll_lengths`` given or of the wrong shape, bad ``logps``.
    """
    check_positive("beta", beta, "orpo")
    check_smoothing("orpo", label_smoothing, False)
    b = prepare(logps, "orpo")
    chosen, rejected = b.chosen / b.chosen_lengths, b.rejected / b.rejected_lengths
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    if (nll_logps is None) != (nll_lengths is None):
        raise ValueError(f"{WHERE}: orpo needs both nll_logps and nll_lengths, or neither")
    if nll_logps is None:
        nll = -chosen  # per-sequence mean NLL of the response (paper Eq. 2)
    else:
        for name, t in (("nll_logps", nll_logps), ("nll_lengths", nll_lengths)):
            if not isinstance(t, torch.Tensor) or t.shape != b.chosen.shape:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{WHERE}: orpo {name} must have shape ({b.size},), got {shape}")
        if bool((nll_lengths < 1).any()):
            raise ValueError(f"{WHERE}: orpo nll_lengths has a token count < 1: {nll_lengths.tolist()}")
        nll = chosen_nll(nll_logps.to(chosen.dtype), nll_lengths.to(chosen.dtype))
    losses = nll - beta * ratio
    return loss_output(losses, beta * chosen, beta * rejected, chosen, rejected, nll,
                   log_odds_ratio=ratio.mean(), log_odds_chosen=log_odds.mean())

