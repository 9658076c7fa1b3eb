"""Model kinds: one small adapter per kind of model, one dispatch.

Every kind answers the same questions for a laid-out batch (:mod:`preftune.engine.layout`):

* ``hidden_at_targets(model, batch) -> (hidden, extras)``: the hidden states ``(M, H)`` that
  score the batch's ``M`` targets (``batch["target_index"]``), and a dict of extra loss terms
  computed by the model on the way (``{"aux_loss": tensor ()}`` for a mixture-of-experts router;
  empty otherwise);
* ``head(model)``: the module mapping ``(..., H)`` to the scores (the LM head, ``(..., V)``
  logits; a value head, ``(..., 1)``);
* ``name``: a short name for logs and errors.

:func:`kind_for` picks the adapter of a model; a model that no kind supports raises
:class:`preftune.errors.UnsupportedModelError` naming the model type and the kinds there are.
New kinds (encoder–decoder, vision–language, value head) register in :data:`KINDS` in the order
they are tried; the first whose ``matches(model)`` is true wins.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from preftune.errors import UnsupportedModelError


class ModelKind(Protocol):
    """What the engine needs from a model kind (see the module docstring)."""

    name: str

    def matches(self, model: nn.Module) -> bool: ...

    def hidden_at_targets(self, model: nn.Module, batch: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def head(self, model: nn.Module) -> nn.Module: ...


KINDS: list[ModelKind] = []


def register_kind(kind: ModelKind, *, first: bool = False) -> ModelKind:
    """Add ``kind`` to :data:`KINDS` (tried before the others when ``first``); returns it."""
    if first:
        KINDS.insert(0, kind)
    else:
        KINDS.append(kind)
    return kind


def kind_for(model: nn.Module) -> ModelKind:
    """The adapter of ``model``'s kind.

    Raises:
        UnsupportedModelError: no registered kind supports the model (message: model class,
            ``config.model_type`` and the supported kinds).
    """
    _load_builtin_kinds()
    for kind in KINDS:
        if kind.matches(model):
            return kind
    from preftune.modeling import unwrap_peft

    base = unwrap_peft(model)
    model_type = getattr(getattr(base, "config", None), "model_type", "?")
    raise UnsupportedModelError(
        f"{type(base).__name__} (model_type {model_type!r}) is not supported by any preftune model kind; "
        f"supported: {', '.join(k.name for k in KINDS)}")


_LOADED = False


def _load_builtin_kinds() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib

    # order matters: more specific kinds first, plain causal LMs last
    for module in ("value_head", "seq2seq", "vision", "causal"):
        try:
            importlib.import_module(f"preftune.engine.kinds.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"preftune.engine.kinds.{module}":
                raise
