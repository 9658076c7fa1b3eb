"""Leaf helpers about a loaded model that every layer may use (imports nothing from preftune).

``models/`` (loading) and ``engine/`` (the forward) both read a model through these, so neither has
to import the other for them.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (LoRA layers stay injected), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_config(model: nn.Module) -> Any:
    """The transformers config of ``model`` (peft-wrapped or not), or None."""
    return getattr(unwrap_peft(model), "config", None)


def is_encoder_decoder(model_or_config: Any) -> bool:
    """True for an encoder–decoder model or config (``config.is_encoder_decoder``), peft-wrapped or not."""
    config = model_or_config if not isinstance(model_or_config, nn.Module) else model_config(model_or_config)
    return bool(getattr(config, "is_encoder_decoder", False))


def is_peft_model(model: Any) -> bool:
    """True when ``model`` is a peft ``PeftModel`` (without importing peft when it is not loaded)."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)
