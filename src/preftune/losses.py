"""Preference-optimisation losses over per-sequence log-probabilities.

Every loss is a pure function ``fn(logps: PolicyLogps, *, <hyper-parameters>) -> LossOutput``:

* inputs (:class:`preftune.types.PolicyLogps`): summed completion log-probs (nats) of the chosen
  and rejected completions ``(B,)``, their token counts ``(B,)`` and, for DPO, the same sums
  under the reference policy ``(B,)``;
* output (:class:`preftune.types.LossOutput`): the per-example loss ``(B,)`` whose mean is the
  batch loss, detached chosen / rejected rewards ``(B,)`` and detached scalar metrics named as
  TRL 1.16 names them (``logps/chosen``, ``logps/rejected``, ``nll_loss``; ORPO adds
  ``log_odds_ratio`` and ``log_odds_chosen``). ``logps/*`` are the batch means of the log-probs
  *as the loss used them*: per-token averages where the loss length-normalises (CPO-IPO, SimPO,
  ORPO), sums otherwise (CPO sigmoid/hinge, every DPO variant, SFT) - what TRL logs.

The reward-model loss ``rm`` (:func:`rm_loss`) is the one entry over scalar rewards instead:
its input is :class:`preftune.types.PairRewards` (value-head outputs ``(B,)``), its metrics are
TRL ``RewardTrainer``'s (``accuracy``, ``margin``, ``min_reward``, ``mean_reward``, ``max_reward``).

The NLL ("BC") regulariser. TRL computes it as one token-mean cross-entropy over all chosen
completion tokens of the batch: ``NLL = -sum_i chosen_logps_i / sum_i chosen_lengths_i``. To
keep a per-example loss whose *mean* is the batch loss, it is spread over the examples as
``nll_i = -chosen_logps_i * B / sum_j chosen_lengths_j`` (see :func:`chosen_nll`), so
``mean_i nll_i`` is exactly TRL's value and so are its gradients. The logged ``nll_loss`` is the
unweighted NLL (0 when the loss has no NLL term), as in TRL.

Global batches (gradient accumulation, several ranks): the NLL-carrying losses (``cpo``,
``simpo``, ``cpo-simpo``, ``dpo`` with ``rpo_alpha``, ``sft``) take ``num_pairs_total`` ``N`` and
``nll_normaliser`` ``T``, the pairs and chosen completion tokens of the *whole* optimizer step
(:class:`preftune.distributed.GlobalCounts`), and spread the NLL as
``nll_i = -chosen_logps_i * N / T``. Then ``sum_i losses_i / N`` over a micro-batch is its exact
share of the full-batch loss ``mean_i term_i + alpha * (-sum_i chosen_logps_i / T)``, and the
shares of all micro-batches add up to it, however the batch is split. The defaults (``B`` and the
batch's own token count) give the per-batch loss above. Every other term is per pair, so the
split only needs the ``1 / N`` weighting, which the trainer applies.

Precision: float16 / bfloat16 inputs are promoted to float32 for the loss arithmetic (token
counts above 256 are not exact in bfloat16); float32 / float64 inputs are kept as they are. The
returned tensors have that compute dtype; gradients flow back to the inputs in their own dtype.

Names: :data:`LOSS_FUNCTIONS` maps ``--loss`` names to the functions, :func:`get_loss_fn` looks
one up and :func:`compute_loss` runs the one chosen by a :class:`~preftune.config.LossArguments`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from preftune.config import LossArguments
from preftune.types import LossOutput, PairRewards, PolicyLogps

_WHERE = "preftune.losses"

LossFn = Callable[..., LossOutput]
PreferenceTerm = Callable[[torch.Tensor, float, float], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Batch:
    """Validated inputs in the compute dtype, all ``(B,)``."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    ref_chosen: Optional[torch.Tensor]
    ref_rejected: Optional[torch.Tensor]

    @property
    def size(self) -> int:
        return self.chosen.shape[0]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _prepare(logps: PolicyLogps, loss: str, *, need_ref: bool = False) -> _Batch:
    """Check shapes, dtypes and token counts of ``logps``; cast to the compute dtype.

    Raises:
        ValueError: a field is missing (reference sums for DPO), is not a 1-D tensor, has a
            shape other than ``(B,)`` with ``B >= 1`` shared by all fields, has a non-floating
            dtype (log-probs), or a token count is < 1.
    """
    fields = ["chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths"]
    if need_ref:
        fields += ["ref_chosen_logps", "ref_rejected_logps"]
    ref_shape = None
    for name in fields:
        value = getattr(logps, name)
        if value is None:
            raise ValueError(f"{_WHERE}: loss {loss!r} needs PolicyLogps.{name}, which is None")
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] < 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{_WHERE}: PolicyLogps.{name} must be a 1-D tensor of shape (B,), B >= 1; got {shape}")
        if ref_shape is None:
            ref_shape = value.shape
        elif value.shape != ref_shape:
            raise ValueError(f"{_WHERE}: PolicyLogps.{name} has shape {tuple(value.shape)}, "
                             f"expected {tuple(ref_shape)} like chosen_logps")
        if name.endswith("_logps") and not value.is_floating_point():
            raise ValueError(f"{_WHERE}: PolicyLogps.{name} must be floating point, got {value.dtype}")
    dtype = _compute_dtype(logps.chosen_logps)
    for name in ("chosen_lengths", "rejected_lengths"):
        if bool((getattr(logps, name) < 1).any()):
            raise ValueError(f"{_WHERE}: PolicyLogps.{name} has a token count < 1: {getattr(logps, name).tolist()}")

    def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(dtype)

    return _Batch(cast(logps.chosen_logps), cast(logps.rejected_logps),
                  cast(logps.chosen_lengths).detach(), cast(logps.rejected_lengths).detach(),
                  cast(logps.ref_chosen_logps) if need_ref else None,
                  cast(logps.ref_rejected_logps) if need_ref else None)


def _check_smoothing(loss: str, label_smoothing: float, allowed: bool) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{_WHERE}: label_smoothing must be in [0, 0.5), got {label_smoothing} (loss {loss!r})")
    if label_smoothing and not allowed:
        raise ValueError(f"{_WHERE}: loss {loss!r} does not use label_smoothing (got {label_smoothing}); "
                         "set it to 0")


def _check_positive(name: str, value: float, loss: str) -> None:
    if not value > 0:
        raise ValueError(f"{_WHERE}: {name} must be > 0 for loss {loss!r}, got {value}")


def _check_weight(name: str, value: float, loss: str) -> None:
    if value < 0:
        raise ValueError(f"{_WHERE}: {name} must be >= 0 for loss {loss!r}, got {value}")


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def chosen_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor, *,
               num_pairs_total: Optional[float] = None, nll_normaliser: Optional[float] = None) -> torch.Tensor:
    """Per-example share of the token-mean NLL of the chosen completions.

    ``nll_i = -chosen_logps_i * N / T`` with ``N = num_pairs_total`` (default ``B``) and
    ``T = nll_normaliser`` (default ``sum_j chosen_lengths_j``). With the defaults ``nll.mean()``
    equals TRL's ``CrossEntropyLoss`` over all chosen completion tokens of the batch,
    ``-sum_i chosen_logps_i / sum_i chosen_lengths_i`` (value and gradients). With the global
    batch's ``N`` and ``T`` (all micro-batches, all ranks), ``nll.sum() / N`` is this batch's exact
    share of the global token mean ``-sum_all chosen_logps / T`` (see the module docstring).

    Args:
        chosen_logps: ``(B,)`` summed token log-probs (nats).
        chosen_lengths: ``(B,)`` token counts (no gradient flows through them).
        num_pairs_total: pairs of the global batch (> 0) or None.
        nll_normaliser: chosen completion tokens of the global batch (> 0) or None.

    Returns:
        ``(B,)`` tensor in nats per token.

    Raises:
        ValueError: ``num_pairs_total`` or ``nll_normaliser`` given and not > 0.
    """
    for name, value in (("num_pairs_total", num_pairs_total), ("nll_normaliser", nll_normaliser)):
        if value is not None and not float(value) > 0:
            raise ValueError(f"{_WHERE}: {name} must be > 0, got {value}")
    n = chosen_logps.shape[0] if num_pairs_total is None else float(num_pairs_total)
    t = chosen_lengths.detach().sum() if nll_normaliser is None else float(nll_normaliser)
    return -chosen_logps * (n / t)


def sigmoid_term(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Bradley-Terry logistic loss with optional label smoothing (conservative DPO / CPO Eq. 3).

    ``-(1 - eps) * log sigmoid(beta * m) - eps * log sigmoid(-beta * m)`` for margin ``m (B,)``.
    """
    return (-(1.0 - label_smoothing) * F.logsigmoid(beta * margin)
            - label_smoothing * F.logsigmoid(-beta * margin))


def hinge_term(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """SLiC hinge loss ``max(0, 1 - beta * m)`` (Zhao et al. 2023, arXiv 2305.10425); ``(B,)``."""
    del label_smoothing
    return torch.relu(1.0 - beta * margin)


def ipo_term(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO squared loss ``(m - 1 / (2 * beta))**2`` with ``beta`` = tau (arXiv 2310.12036, Eq. 17); ``(B,)``."""
    del label_smoothing
    return (margin - 1.0 / (2.0 * beta)) ** 2


def robust_term(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (rDPO, Chowdhury et al. 2024, arXiv 2403.00409, the rDPO loss) with flip rate ``eps``.

    ``[-(1 - eps) * log sigmoid(beta * m) + eps * log sigmoid(-beta * m)] / (1 - 2 * eps)``; ``(B,)``.
    """
    return ((-(1.0 - label_smoothing) * F.logsigmoid(beta * margin)
             + label_smoothing * F.logsigmoid(-beta * margin)) / (1.0 - 2.0 * label_smoothing))


@dataclass(frozen=True)
class Variant:
    """A preference sub-variant: its term, whether it takes label smoothing, whether the margin
    is built from per-token averaged log-probs (as TRL does for IPO)."""

    term: PreferenceTerm
    uses_label_smoothing: bool
    length_normalised: bool


CPO_VARIANTS: dict[str, Variant] = {
    "sigmoid": Variant(sigmoid_term, True, False),
    "hinge": Variant(hinge_term, False, False),
    "ipo": Variant(ipo_term, False, True),
}
DPO_VARIANTS: dict[str, Variant] = {
    "sigmoid": Variant(sigmoid_term, True, False),
    "hinge": Variant(hinge_term, False, False),
    "ipo": Variant(ipo_term, False, True),
    "robust": Variant(robust_term, True, False),
}


def _variant(table: dict[str, Variant], loss: str, loss_type: str) -> Variant:
    if loss_type not in table:
        raise ValueError(f"{_WHERE}: unknown {loss} loss type {loss_type!r}; valid: {', '.join(table)}")
    return table[loss_type]


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def _output(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
            logged_chosen: torch.Tensor, logged_rejected: torch.Tensor, nll: Optional[torch.Tensor],
            **extra: torch.Tensor) -> LossOutput:
    metrics = {
        "logps/chosen": logged_chosen.detach().mean(),
        "logps/rejected": logged_rejected.detach().mean(),
        "nll_loss": nll.detach().mean() if nll is not None else _zero(losses),
    }
    metrics.update({k: v.detach() for k, v in extra.items()})
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach(), metrics)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _add_bc_term(losses: torch.Tensor, b: _Batch, cpo_alpha: float, **normalisers: Optional[float]
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``losses + cpo_alpha * nll`` (CPO's BC regulariser, :func:`chosen_nll` with ``normalisers``:
    ``num_pairs_total``, ``nll_normaliser``); nll is None when alpha is 0."""
    if not cpo_alpha:
        return losses, None
    nll = chosen_nll(b.chosen, b.chosen_lengths, **normalisers)
    return losses + cpo_alpha * nll, nll


def cpo_loss(logps: PolicyLogps, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, cpo_alpha: float = 1.0, num_pairs_total: Optional[float] = None,
             nll_normaliser: Optional[float] = None) -> LossOutput:
    """Contrastive Preference Optimization (Xu et al. 2024, arXiv 2401.08417).

    ``loss_i = term(pi_c - pi_r) + cpo_alpha * nll_i`` where ``pi_*`` are the summed log-probs for
    ``sigmoid`` (Eq. 3, ``-log sigmoid(beta * (pi_c - pi_r))``, label-smoothed as in
    :func:`sigmoid_term`) and ``hinge``, and the per-token averages for ``ipo`` (as TRL 1.16:
    ``(avg_c - avg_r - 1/(2 beta))**2``). ``nll_i`` is :func:`chosen_nll` (the L_NLL / BC
    regulariser, Sec. 3). Rewards ``beta * pi_*``; ``logps/*`` log ``pi_*``.

    Args:
        logps: ``PolicyLogps`` with ``(B,)`` tensors (reference sums are ignored).
        beta: temperature (> 0); for ``ipo`` the regulariser tau.
        loss_type: one of :data:`CPO_VARIANTS` (``sigmoid``, ``hinge``, ``ipo``).
        label_smoothing: in [0, 0.5); ``sigmoid`` only (TRL warns and ignores it for hinge/ipo,
            here it is an error).
        cpo_alpha: weight of the NLL term (>= 0); 0 disables it (``nll_loss`` logged as 0).
        num_pairs_total, nll_normaliser: pairs and chosen completion tokens of the global batch for
            the NLL term (:func:`chosen_nll`); None: this batch's.

    Returns:
        ``LossOutput`` with ``losses (B,)``.

    Raises:
        ValueError: unknown ``loss_type``, ``beta <= 0``, ``cpo_alpha < 0``, label smoothing out of
            range or given to hinge/ipo, or bad ``logps`` (see module doc).
    """
    variant = _variant(CPO_VARIANTS, "cpo", loss_type)
    _check_positive("beta", beta, "cpo")
    _check_weight("cpo_alpha", cpo_alpha, "cpo")
    _check_smoothing(f"cpo/{loss_type}", label_smoothing, variant.uses_label_smoothing)
    b = _prepare(logps, "cpo")
    chosen, rejected = b.chosen, b.rejected
    if variant.length_normalised:
        chosen, rejected = chosen / b.chosen_lengths, rejected / b.rejected_lengths
    losses = variant.term(chosen - rejected, beta, label_smoothing)
    losses, nll = _add_bc_term(losses, b, cpo_alpha, num_pairs_total=num_pairs_total, nll_normaliser=nll_normaliser)
    return _output(losses, beta * chosen, beta * rejected, chosen, rejected, nll)


def simpo_loss(logps: PolicyLogps, *, beta: float = 2.0, simpo_gamma: float = 0.5,
               label_smoothing: float = 0.0, cpo_alpha: float = 0.0, num_pairs_total: Optional[float] = None,
               nll_normaliser: Optional[float] = None) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6), optionally with the CPO NLL term.

    ``loss_i = -(1 - eps) log sigmoid(z_i) - eps log sigmoid(-z_i) + cpo_alpha * nll_i`` with
    ``z_i = beta * (avg_c - avg_r) - simpo_gamma``, ``avg_* = logps_* / lengths_*`` (the
    length-normalised reward, Eq. 4). ``cpo_alpha > 0`` is CPO-SimPO (TRL's CPOTrainer with
    ``loss_type="simpo"`` and ``cpo_alpha``). Rewards ``beta * avg_*``; ``logps/*`` log ``avg_*``.
    Label smoothing is not in the paper; it is TRL's conservative form.

    Args:
        logps: ``PolicyLogps`` with ``(B,)`` tensors.
        beta: reward scale (> 0). simpo_gamma: target reward margin gamma (nats, any sign).
        label_smoothing: in [0, 0.5). cpo_alpha: NLL weight (>= 0).
        num_pairs_total, nll_normaliser: pairs and chosen completion tokens of the global batch for
            the NLL term (:func:`chosen_nll`); None: this batch's.

    Returns:
        ``LossOutput`` with ``losses (B,)``.

    Raises:
        ValueError: ``beta <= 0``, ``cpo_alpha < 0``, label smoothing out of range, bad ``logps``.
    """
    _check_positive("beta", beta, "simpo")
    _check_weight("cpo_alpha", cpo_alpha, "simpo")
    _check_smoothing("simpo", label_smoothing, True)
    b = _prepare(logps, "simpo")
    chosen, rejected = b.chosen / b.chosen_lengths, b.rejected / b.rejected_lengths
    losses = sigmoid_term(chosen - rejected - simpo_gamma / beta, beta, label_smoothing)
    losses, nll = _add_bc_term(losses, b, cpo_alpha, num_pairs_total=num_pairs_total, nll_normaliser=nll_normaliser)
    return _output(losses, beta * chosen, beta * rejected, chosen, rejected, nll)


def cpo_simpo_loss(logps: PolicyLogps, *, beta: float = 2.0, simpo_gamma: float = 0.5,
                   label_smoothing: float = 0.0, cpo_alpha: float = 1.0, num_pairs_total: Optional[float] = None,
                   nll_normaliser: Optional[float] = None) -> LossOutput:
    """CPO-SimPO: :func:`simpo_loss` plus ``cpo_alpha`` (default 1.0) x the chosen NLL.

    Same formula, shapes and errors as :func:`simpo_loss`; only the default ``cpo_alpha`` differs.
    """
    return simpo_loss(logps, beta=beta, simpo_gamma=simpo_gamma, label_smoothing=label_smoothing,
                      cpo_alpha=cpo_alpha, num_pairs_total=num_pairs_total, nll_normaliser=nll_normaliser)


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
    _check_positive("beta", beta, "orpo")
    _check_smoothing("orpo", label_smoothing, False)
    b = _prepare(logps, "orpo")
    chosen, rejected = b.chosen / b.chosen_lengths, b.rejected / b.rejected_lengths
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    if (nll_logps is None) != (nll_lengths is None):
        raise ValueError(f"{_WHERE}: orpo needs both nll_logps and nll_lengths, or neither")
    if nll_logps is None:
        nll = -chosen  # per-sequence mean NLL of the response (paper Eq. 2)
    else:
        for name, t in (("nll_logps", nll_logps), ("nll_lengths", nll_lengths)):
            if not isinstance(t, torch.Tensor) or t.shape != b.chosen.shape:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{_WHERE}: orpo {name} must have shape ({b.size},), got {shape}")
        if bool((nll_lengths < 1).any()):
            raise ValueError(f"{_WHERE}: orpo nll_lengths has a token count < 1: {nll_lengths.tolist()}")
        nll = chosen_nll(nll_logps.to(chosen.dtype), nll_lengths.to(chosen.dtype))
    losses = nll - beta * ratio
    return _output(losses, beta * chosen, beta * rejected, chosen, rejected, nll,
                   log_odds_ratio=ratio.mean(), log_odds_chosen=log_odds.mean())


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
    variant = _variant(DPO_VARIANTS, "dpo", loss_type)
    _check_positive("beta", beta, "dpo")
    if rpo_alpha is not None:
        _check_weight("rpo_alpha", rpo_alpha, "dpo")
    _check_smoothing(f"dpo/{loss_type}", label_smoothing, variant.uses_label_smoothing)
    b = _prepare(logps, "dpo", need_ref=True)
    chosen_ratio, rejected_ratio = b.chosen - b.ref_chosen, b.rejected - b.ref_rejected
    if variant.length_normalised:
        margin = chosen_ratio / b.chosen_lengths - rejected_ratio / b.rejected_lengths
    else:
        margin = chosen_ratio - rejected_ratio
    losses = variant.term(margin, beta, label_smoothing)
    nll = chosen_nll(b.chosen, b.chosen_lengths, num_pairs_total=num_pairs_total,
                     nll_normaliser=nll_normaliser) if rpo_alpha else None
    if nll is not None:
        losses = losses + rpo_alpha * nll
    return _output(losses, beta * chosen_ratio, beta * rejected_ratio, b.chosen, b.rejected, nll)


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
    _check_smoothing("sft", label_smoothing, False)
    b = _prepare(logps, "sft")
    nll = chosen_nll(b.chosen, b.chosen_lengths, num_pairs_total=num_pairs_total, nll_normaliser=nll_normaliser)
    return _output(nll, b.chosen / b.chosen_lengths, b.rejected / b.rejected_lengths,
                   b.chosen, b.rejected, nll)


def _prepare_rewards(rewards: PairRewards) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Check and cast the reward-model inputs: ``(chosen, rejected, margin)``, all ``(B,)``.

    Raises:
        ValueError: ``rewards`` is not a :class:`PairRewards`, a field is not a floating 1-D tensor of
            one shared shape ``(B,)`` with ``B >= 1``, or the margin holds a non-finite value.
    """
    if not isinstance(rewards, PairRewards):
        raise ValueError(f"{_WHERE}: loss 'rm' needs PairRewards (preftune.engine.rewards.sequence_rewards), "
                         f"got {type(rewards).__name__}")
    shape = None
    for name in ("chosen_rewards", "rejected_rewards", "margin"):
        value = getattr(rewards, name)
        if value is None and name == "margin":
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] < 1 \
                or not value.is_floating_point():
            desc = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{_WHERE}: PairRewards.{name} must be a floating 1-D tensor of shape (B,), B >= 1; "
                             f"got {desc}")
        if shape is None:
            shape = value.shape
        elif value.shape != shape:
            raise ValueError(f"{_WHERE}: PairRewards.{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    dtype = _compute_dtype(rewards.chosen_rewards)
    margin = rewards.margin
    if margin is not None:
        if not bool(torch.isfinite(margin).all()):
            raise ValueError(f"{_WHERE}: PairRewards.margin holds a non-finite value: {margin.tolist()}")
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
            raise ValueError(f"{_WHERE}: center_rewards_coefficient must be finite and >= 0, got {c}")
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


# --------------------------------------------------------------------------------------------
# Name tables and dispatch
# --------------------------------------------------------------------------------------------

LOSS_FUNCTIONS: dict[str, LossFn] = {
    "cpo": cpo_loss,
    "simpo": simpo_loss,
    "cpo-simpo": cpo_simpo_loss,
    "orpo": orpo_loss,
    "dpo": dpo_loss,
    "sft": sft_loss,
    "rm": rm_loss,
}


def _simpo_hparams(a: LossArguments) -> dict[str, Any]:
    return {"beta": a.beta, "simpo_gamma": a.simpo_gamma, "label_smoothing": a.label_smoothing,
            "cpo_alpha": a.cpo_alpha}


# name -> LossArguments -> keyword hyper-parameters of that loss.
_HPARAMS: dict[str, Callable[[LossArguments], dict[str, Any]]] = {
    "cpo": lambda a: {"beta": a.beta, "loss_type": a.cpo_loss_type, "label_smoothing": a.label_smoothing,
                      "cpo_alpha": a.cpo_alpha},
    "simpo": _simpo_hparams,
    "cpo-simpo": _simpo_hparams,
    "orpo": lambda a: {"beta": a.beta, "label_smoothing": a.label_smoothing},
    "dpo": lambda a: {"beta": a.beta, "loss_type": a.dpo_loss_type, "label_smoothing": a.label_smoothing,
                      "rpo_alpha": a.rpo_alpha},
    "sft": lambda a: {"label_smoothing": a.label_smoothing},
    "rm": lambda a: {"center_rewards_coefficient": a.center_rewards_coefficient},
}
# Which losses read which NLL weight; a non-zero weight given to another loss is an error.
_NLL_WEIGHT_OWNERS = {"cpo_alpha": ("cpo", "simpo", "cpo-simpo"), "rpo_alpha": ("dpo",)}


def get_loss_fn(name: str) -> LossFn:
    """The loss function registered under ``name`` (a ``--loss`` value).

    Raises:
        ValueError: ``name`` is unknown; the message lists the valid names.
    """
    try:
        return LOSS_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"{_WHERE}: unknown loss {name!r}; valid: {', '.join(LOSS_FUNCTIONS)}") from None


def compute_loss(logps: PolicyLogps | PairRewards, args: LossArguments, *, num_pairs_total: Optional[float] = None,
                 nll_normaliser: Optional[float] = None) -> LossOutput:
    """Run the loss ``args.loss`` with its hyper-parameters from ``args`` on ``logps``.

    Args:
        logps: ``PolicyLogps`` of B pairs (``(B,)`` tensors; reference sums for ``dpo``), or
            :class:`PairRewards` for ``rm``.
        args: validated ``LossArguments``.
        num_pairs_total, nll_normaliser: the global batch's pairs and chosen completion tokens,
            passed to the losses that take them (those with an NLL term; see the module docstring);
            ignored by the others (their terms are per pair).

    Returns:
        ``LossOutput``; ``losses.mean()`` is the batch loss (with the global counts,
        ``losses.sum() / num_pairs_total`` is this batch's share of the global batch loss).

    Raises:
        ValueError: unknown loss name, an NLL weight (``cpo_alpha`` / ``rpo_alpha``) set to a
            non-zero value for a loss that does not use it, or any error of the loss itself.
    """
    fn = get_loss_fn(args.loss)
    if isinstance(logps, PairRewards) != (args.loss == "rm"):
        raise ValueError(f"{_WHERE}: loss {args.loss!r} takes "
                         f"{'PairRewards' if args.loss == 'rm' else 'PolicyLogps'}, got {type(logps).__name__}")
    for weight, owners in _NLL_WEIGHT_OWNERS.items():
        if getattr(args, weight) and args.loss not in owners:
            raise ValueError(f"{_WHERE}: --{weight} applies to --loss {'/'.join(owners)} only, "
                             f"not {args.loss!r} (got {getattr(args, weight)})")
    hparams = _HPARAMS[args.loss](args)
    if num_pairs_total is not None or nll_normaliser is not None:
        accepted = _keyword_names(fn)
        for name, value in (("num_pairs_total", num_pairs_total), ("nll_normaliser", nll_normaliser)):
            if value is not None and name in accepted:
                hparams[name] = value
    return fn(logps, **hparams)


def _keyword_names(fn: LossFn) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)
