"""Shared pieces of the losses: input checks, the chosen-completion NLL, the preference terms
(sigmoid, hinge, IPO, robust), :class:`Variant` and the output builder.

Everything here works on ``(B,)`` tensors: per-sequence summed log-probs (nats) and token counts of
:class:`preftune.types.PolicyLogps` (see :mod:`preftune.losses` for the conventions every loss follows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from preftune.types import LossOutput, PolicyLogps

WHERE = "preftune.losses"

LossFn = Callable[..., LossOutput]
PreferenceTerm = Callable[[torch.Tensor, float, float], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Validated inputs in the compute dtype, all ``(B,)``: summed log-probs (nats) of the chosen /
    rejected completions, their token counts (detached) and, for DPO, the reference sums."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    ref_chosen: Optional[torch.Tensor]
    ref_rejected: Optional[torch.Tensor]

    @property
    def size(self) -> int:
        """``B``, the number of pairs."""
        return self.chosen.shape[0]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for float16 / bfloat16 inputs (token counts above 256 are not exact in bfloat16),
    the input's own dtype otherwise."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def prepare(logps: PolicyLogps, loss: str, *, need_ref: bool = False) -> Batch:
    """Check shapes, dtypes and token counts of ``logps``; cast to the compute dtype.

    Returns:
        A :class:`Batch` of ``(B,)`` tensors (reference sums only with ``need_ref``).

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
            raise ValueError(f"{WHERE}: loss {loss!r} needs PolicyLogps.{name}, which is None")
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] < 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{WHERE}: PolicyLogps.{name} must be a 1-D tensor of shape (B,), B >= 1; got {shape}")
        if ref_shape is None:
            ref_shape = value.shape
        elif value.shape != ref_shape:
            raise ValueError(f"{WHERE}: PolicyLogps.{name} has shape {tuple(value.shape)}, "
                             f"expected {tuple(ref_shape)} like chosen_logps")
        if name.endswith("_logps") and not value.is_floating_point():
            raise ValueError(f"{WHERE}: PolicyLogps.{name} must be floating point, got {value.dtype}")
    dtype = compute_dtype(logps.chosen_logps)
    for name in ("chosen_lengths", "rejected_lengths"):
        if bool((getattr(logps, name) < 1).any()):
            raise ValueError(f"{WHERE}: PolicyLogps.{name} has a token count < 1: {getattr(logps, name).tolist()}")

    def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(dtype)

    return Batch(cast(logps.chosen_logps), cast(logps.rejected_logps),
                 cast(logps.chosen_lengths).detach(), cast(logps.rejected_lengths).detach(),
                 cast(logps.ref_chosen_logps) if need_ref else None,
                 cast(logps.ref_rejected_logps) if need_ref else None)


def check_smoothing(loss: str, label_smoothing: float, allowed: bool) -> None:
    """Raises ValueError: ``label_smoothing`` outside [0, 0.5), or non-zero where not ``allowed``."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{WHERE}: label_smoothing must be in [0, 0.5), got {label_smoothing} (loss {loss!r})")
    if label_smoothing and not allowed:
        raise ValueError(f"{WHERE}: loss {loss!r} does not use label_smoothing (got {label_smoothing}); "
                         "set it to 0")


def check_positive(name: str, value: float, loss: str) -> None:
    """Raises ValueError: ``value`` (a temperature such as beta) is not > 0."""
    if not value > 0:
        raise ValueError(f"{WHERE}: {name} must be > 0 for loss {loss!r}, got {value}")


def check_weight(name: str, value: float, loss: str) -> None:
    """Raises ValueError: ``value`` (a term weight such as cpo_alpha) is < 0."""
    if value < 0:
        raise ValueError(f"{WHERE}: {name} must be >= 0 for loss {loss!r}, got {value}")


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
    share of the global token mean ``-sum_all chosen_logps / T`` (see :mod:`preftune.losses`).

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
            raise ValueError(f"{WHERE}: {name} must be > 0, got {value}")
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


def pick_variant(table: dict[str, Variant], loss: str, loss_type: str) -> Variant:
    """``table[loss_type]``.

    Raises:
        ValueError: ``loss_type`` is not in ``table``; the message lists the valid names.
    """
    if loss_type not in table:
        raise ValueError(f"{WHERE}: unknown {loss} loss type {loss_type!r}; valid: {', '.join(table)}")
    return table[loss_type]


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def loss_output(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                logged_chosen: torch.Tensor, logged_rejected: torch.Tensor, nll: Optional[torch.Tensor],
                **extra: torch.Tensor) -> LossOutput:
    """The :class:`LossOutput` of a log-prob loss: ``losses (B,)``, detached rewards ``(B,)`` and
    TRL's scalar metrics: ``rewards/chosen``, ``rewards/rejected`` (batch means of the rewards),
    ``rewards/accuracies`` (share of pairs with chosen reward > rejected), ``rewards/margins`` (mean
    chosen - rejected), ``logps/chosen`` / ``logps/rejected`` (batch means of ``logged_*``),
    ``nll_loss`` (mean of ``nll``, 0 when None) plus the detached ``extra`` scalars."""
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": logged_chosen.detach().mean(),
        "logps/rejected": logged_rejected.detach().mean(),
        "nll_loss": nll.detach().mean() if nll is not None else _zero(losses),
    }
    metrics.update({k: v.detach() for k, v in extra.items()})
    return LossOutput(losses, chosen, rejected, metrics)
