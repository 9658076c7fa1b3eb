"""The engine's per-forward set-up, shared by every model kind's ``score``."""

from __future__ import annotations

import torch
from torch import nn

from preftune.engine.lora_fused import install_fused_lora
from preftune.engine.memory import prepare_training_step
from preftune.engine.options import EngineOptions, engine_options


def prepare_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> EngineOptions:
    """The engine's switches for one forward of ``model`` over a laid-out ``batch``; returns them
    (:class:`preftune.engine.options.EngineOptions`).

    Installs (idempotently) the fused LoRA epilogue when ``--fused_lora`` asks for it and, for a
    training forward (train mode, gradients on), the heap trimming hooks, compiled layers and this
    batch's layer-checkpointing plan from ``--max_activation_memory_gb``
    (:func:`preftune.engine.memory.prepare_training_step`). Every kind's forward goes through it:
    the ``score`` of :mod:`preftune.engine.kinds.base` and :mod:`preftune.engine.kinds.value_head`.
    """
    options = engine_options(model)
    if getattr(model, "_preftune_fused_lora", False) != options.fused_lora:
        install_fused_lora(model, options.fused_lora)
        model._preftune_fused_lora = options.fused_lora
    if model.training and torch.is_grad_enabled():
        prepare_training_step(model, batch, options)
    return options
