"""The engine's per-forward set-up, shared by every model kind's ``score``.

Besides the engine's switches (:mod:`preftune.engine.options`) a model carries what its per-sequence
outputs must hold for the loss (:class:`SequenceOutputs`: LD-DPO's length-desensitised sums, WPO's
aligned log-probs), and, with TR-DPO over precomputed reference log-probs, the current reference values
of the training pairs (:func:`set_reference_table`), which replace a batch's when it was laid out
before the last reference update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from preftune.engine.lora_fused import install_fused_lora
from preftune.engine.memory import prepare_training_step
from preftune.engine.options import EngineOptions, engine_options

_OUTPUTS_ATTR = "_preftune_sequence_outputs"
_REF_TABLE_ATTR = "_preftune_reference_table"


@dataclass(frozen=True)
class SequenceOutputs:
    """What :func:`preftune.engine.lm_head.per_sequence_logps` adds to the plain sums of a model's forward.

    ``ld_alpha``: LD-DPO (Liu et al. 2024, arXiv 2409.06411): the sums are ``shared + ld_alpha * tail``
    for the policy and the reference alike (None: plain sums). ``aligned_logps``: WPO (Zhou et al. 2024,
    arXiv 2406.11827): the per-sequence sums of ``log p_t - log sum_v p_v^2`` (one more reduction per
    LM-head chunk).
    """

    ld_alpha: Optional[float] = None
    aligned_logps: bool = False


NONE = SequenceOutputs()


def _set_on(model: nn.Module, attr: str, value) -> None:
    for module in model.modules():
        if module is model or hasattr(module, "config"):
            setattr(module, attr, value)


def configure_sequence_outputs(model: nn.Module, *, ld_alpha: Optional[float] = None,
                               aligned_logps: bool = False) -> SequenceOutputs:
    """Store on ``model`` (and its submodules with a ``config``, as
    :func:`preftune.engine.options.configure_engine`) what its per-sequence outputs hold; returns it.

    Raises:
        ValueError: ``ld_alpha`` outside ``[0, 1]``.
    """
    if ld_alpha is not None and not 0.0 <= float(ld_alpha) <= 1.0:
        raise ValueError(f"--ld_alpha must be in [0, 1], got {ld_alpha}")
    outputs = SequenceOutputs(None if ld_alpha is None else float(ld_alpha), bool(aligned_logps))
    _set_on(model, _OUTPUTS_ATTR, outputs)
    return outputs


def configure_for_loss(loss_args, policy: Optional[nn.Module], *references: Optional[nn.Module]) -> None:
    """Configure the per-sequence outputs a loss needs (``loss_args``: a LossArguments, duck-typed:
    ``ld_alpha``, ``use_weighting``): ``policy`` with LD-DPO's sums and WPO's aligned sums, every
    reference model (None skipped) with LD-DPO's sums only (the reference is scored the same way).

    Raises:
        ValueError: as :func:`configure_sequence_outputs`.
    """
    ld_alpha = getattr(loss_args, "ld_alpha", None)
    if policy is not None:
        configure_sequence_outputs(policy, ld_alpha=ld_alpha, aligned_logps=getattr(loss_args, "use_weighting", False))
    for reference in references:
        if reference is not None:
            configure_sequence_outputs(reference, ld_alpha=ld_alpha)


def sequence_outputs(model: nn.Module) -> SequenceOutputs:
    """What :func:`configure_sequence_outputs` stored on ``model`` (default: plain sums only)."""
    return getattr(model, _OUTPUTS_ATTR, NONE)


def set_reference_table(model: nn.Module, chosen: Optional[torch.Tensor], rejected: Optional[torch.Tensor]) -> None:
    """Current reference sums ``(N,)`` of the training pairs by ``record_index`` (TR-DPO with precomputed
    reference log-probs; None: remove). A training forward of ``model`` then takes a batch's
    ``ref_chosen_logps`` / ``ref_rejected_logps`` from it: a batch laid out (prefetched) before the last
    reference update would carry the previous values."""
    _set_on(model, _REF_TABLE_ATTR, None if chosen is None else (chosen.detach().cpu(), rejected.detach().cpu()))


def _refresh_reference(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    table = getattr(model, _REF_TABLE_ATTR, None)
    if table is None or not model.training or "record_index" not in batch or "ref_chosen_logps" not in batch:
        return
    index = batch["record_index"].cpu()
    for key, values in zip(("ref_chosen_logps", "ref_rejected_logps"), table):
        batch[key] = values[index].to(device=batch[key].device, dtype=batch[key].dtype)


def prepare_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> EngineOptions:
    """The engine's switches for one forward of ``model`` over a laid-out ``batch``; returns them
    (:class:`preftune.engine.options.EngineOptions`).

    Installs (idempotently) the fused LoRA epilogue when ``--fused_lora`` asks for it and, for a
    training forward (train mode, gradients on), the heap trimming hooks, compiled layers and this
    batch's layer-checkpointing plan from ``--max_activation_memory_gb``
    (:func:`preftune.engine.memory.prepare_training_step`). In train mode a reference table
    (:func:`set_reference_table`) replaces the batch's reference sums. Every kind's forward goes
    through it: the ``score`` of :mod:`preftune.engine.kinds.base` and :mod:`preftune.engine.kinds.value_head`.
    """
    options = engine_options(model)
    if getattr(model, "_preftune_fused_lora", False) != options.fused_lora:
        install_fused_lora(model, options.fused_lora)
        model._preftune_fused_lora = options.fused_lora
    _refresh_reference(model, batch)
    if model.training and torch.is_grad_enabled():
        prepare_training_step(model, batch, options)
    return options
