"""Decoder-only causal LMs: the decoder over the packed rows, then the LM head.

The default kind (loaded with ``AutoModelForCausalLM``; any config no other kind claims). A
mixture-of-experts decoder with router logits enabled also returns the router load-balancing loss
(``{"aux_loss": ...}``, :mod:`preftune.engine.kinds.moe`) with its weight (``router_aux_loss_coef``);
plain models return no extra terms. Encoder-only models (BERT ...) are refused from their config.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from preftune.engine.attention import attention_inputs
from preftune.engine.kinds.base import ModelKind, config_value
from preftune.engine.kinds.moe import router_aux_coef, router_aux_enabled, router_aux_loss
from preftune.engine.lm_head import get_decoder_and_head
from preftune.errors import UnsupportedModelError
from preftune.modeling import is_encoder_decoder, unwrap_peft

__all__ = ["CausalKind", "KIND", "SUPPORTED_TEXT", "check_text_architecture", "get_decoder_and_head"]

SUPPORTED_TEXT = ("decoder-only causal LMs (Llama, Qwen, Mistral, SmolLM, GPT-2, Mixtral/Qwen-MoE ...)",
                  "encoder–decoder LMs (T5, mT5, BART, mBART, Marian, Pegasus, M2M-100)",
                  "vision–language models with their processor")


def check_text_architecture(config: Any, name: Optional[str]) -> None:
    """Refuse an encoder-only model before loading it: ``AutoModelForCausalLM`` would build e.g.
    ``BertLMHeadModel`` with bidirectional attention, whose "next-token" log-probs see the token they score.

    Raises:
        UnsupportedModelError: a masked LM (BERT-like) whose config is not a decoder, naming the
            model type and what is supported.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = config_value(config, "model_type")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config_value(config, "is_decoder", False) \
            and not is_encoder_decoder(config):
        raise UnsupportedModelError(
            f"--model_name_or_path {name}: model_type {model_type!r} is an encoder-only model (bidirectional "
            "attention): it cannot score a completion token by token. Supported: " + "; ".join(SUPPORTED_TEXT))


class CausalKind(ModelKind):
    """Decoder-only LMs (Llama, Qwen, Mistral, SmolLM, GPT-2 ...)."""

    name = "causal"

    def matches(self, model: nn.Module) -> bool:
        base = unwrap_peft(model)
        if is_encoder_decoder(base):  # kinds/seq2seq.py
            return False
        return hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings") and \
            base.get_output_embeddings() is not None

    def matches_config(self, config: Any, *, reward_model: bool = False) -> bool:
        return True  # the fallback: an unreadable config (None) too, whose loader reports why

    def check_config(self, config: Any, name: Optional[str]) -> None:
        if config is not None:
            check_text_architecture(config, name)

    def hidden_at_targets(self, model: nn.Module, batch: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        decoder, _ = get_decoder_and_head(model)
        kwargs = attention_inputs(model, batch)
        moe = router_aux_enabled(model)
        if moe:  # mixture of experts: the router logits give the load-balancing loss (kinds/moe.py)
            kwargs["output_router_logits"] = True
        outputs = decoder(input_ids=batch["input_ids"], use_cache=False, **kwargs)
        hidden = outputs.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"])
        return flat, ({"aux_loss": router_aux_loss(model, outputs, batch)} if moe else {})

    def head(self, model: nn.Module) -> nn.Module:
        return get_decoder_and_head(model)[1]

    def extra_loss_weights(self, model: nn.Module, extras: dict[str, torch.Tensor]) -> dict[str, float]:
        """``{"aux_loss": router_aux_loss_coef}`` when the router loss was computed (:func:`router_aux_coef`)."""
        return {"aux_loss": router_aux_coef(model)} if "aux_loss" in extras else {}


KIND = CausalKind()
