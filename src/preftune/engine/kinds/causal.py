"""Decoder-only causal LMs: the decoder over the packed rows, then the LM head.

The default kind. A mixture-of-experts decoder with router logits enabled also returns the router
load-balancing loss in ``extras`` (``{"aux_loss": ...}``, :mod:`preftune.engine.kinds.moe`); plain
models return no extras.
"""

from __future__ import annotations

import torch
from torch import nn

from preftune.engine.attention import attention_inputs
from preftune.engine.kinds import register_kind
from preftune.errors import UnsupportedModelError


def get_decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a causal LM into ``(decoder, lm_head)`` so log-probs can be computed from hidden states.

    ``decoder(input_ids=..., attention_mask=...)`` returns an output whose ``last_hidden_state``
    ``[B, T, H]`` is the final (normed) hidden state, and ``lm_head(h)`` maps ``[..., H]`` to logits
    ``[..., V]``; together they equal ``model(...).logits`` (``lm_head`` may be LoRA-wrapped and/or
    tied to the input embeddings; it is the very module the model calls).

    Raises:
        UnsupportedModelError: the model has no decoder/output embedding, or post-processes its
            logits (soft-capping or scaling), which the split would silently drop.
    """
    from preftune.modeling import unwrap_peft

    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(text_config, attr, None)
        if value not in (None, 1, 1.0):
            raise UnsupportedModelError(
                f"{type(base).__name__} (model_type {getattr(config, 'model_type', '?')!r}) applies "
                f"config.{attr}={value} to its logits; preftune's chunked LM head does not support such models")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if head is None or decoder is None or decoder is base:
        raise UnsupportedModelError(
            f"{type(base).__name__} (model_type {getattr(config, 'model_type', '?')!r}) is not a causal LM "
            "with a separate decoder and lm_head")
    return decoder, head


class CausalKind:
    """Decoder-only LMs (Llama, Qwen, Mistral, SmolLM, GPT-2 ...)."""

    name = "causal"

    def matches(self, model: nn.Module) -> bool:
        from preftune.modeling import unwrap_peft

        base = unwrap_peft(model)
        if getattr(getattr(base, "config", None), "is_encoder_decoder", False):  # kinds/seq2seq.py
            return False
        return hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings") and \
            base.get_output_embeddings() is not None

    def hidden_at_targets(self, model: nn.Module, batch: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from preftune.engine.kinds.moe import router_aux_enabled, router_aux_loss

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


CAUSAL = register_kind(CausalKind())
