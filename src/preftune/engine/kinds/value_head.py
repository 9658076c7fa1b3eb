"""Reward models: a transformer body with a scalar value head, no LM head at all.

A reward model is ``AutoModelForSequenceClassification`` with ``num_labels=1`` (``LlamaForSequenceClassification``,
``Qwen2ForSequenceClassification`` ...): the body (``model.<base_model_prefix>``) gives the final
hidden states, the head ``model.score`` (``Linear(H, 1)``) maps a hidden state to a reward. The
reward of a sequence is the head's value at its last non-pad token (transformers' rule, see
:func:`preftune.engine.layout._last_tokens`), so this kind's *targets* are the ``2B`` last tokens
``batch["last_index"]`` of a laid-out batch (chosen ``0..B-1``, rejected ``B..2B-1``). The body runs
once over the packed rows like the causal kind (shared prompt computed once for chosen and
rejected, padding-free packing); only ``2B`` hidden states reach the head. With LoRA the body holds
the adapters and the head is a fully trained copy (peft ``modules_to_save``).
"""

from __future__ import annotations

import torch
from torch import nn

from preftune.engine.attention import attention_inputs
from preftune.engine.kinds import register_kind
from preftune.errors import UnsupportedModelError

HEAD_NAME = "score"


def _base(model: nn.Module) -> nn.Module:
    from preftune.modeling import unwrap_peft

    return unwrap_peft(model)


def is_reward_model(model: nn.Module) -> bool:
    """True for a sequence classifier with a ``score`` head (peft-wrapped or not)."""
    base = _base(model)
    return type(base).__name__.endswith("ForSequenceClassification") and isinstance(
        getattr(base, HEAD_NAME, None), nn.Module)


def body_of(model: nn.Module) -> nn.Module:
    """The transformer body of a sequence classifier (``model.<base_model_prefix>``).

    Raises:
        UnsupportedModelError: no body under ``base_model_prefix``, or ``num_labels != 1``.
    """
    base = _base(model)
    config = base.config
    if getattr(config, "num_labels", 1) != 1:
        raise UnsupportedModelError(
            f"{type(base).__name__} has num_labels={config.num_labels}; a reward model has one scalar output "
            "(load it with num_labels=1)")
    body = getattr(base, getattr(base, "base_model_prefix", "model") or "model", None)
    if not isinstance(body, nn.Module) or body is base:
        raise UnsupportedModelError(f"{type(base).__name__} has no transformer body under "
                                    f"base_model_prefix {getattr(base, 'base_model_prefix', None)!r}")
    return body


class ValueHeadKind:
    """Sequence classifiers with one label: hidden states at each sequence's last token → ``score``."""

    name = "value_head"
    # the engine's sequence_logps needs an LM head; this kind scores sequences (engine.rewards)
    scores_sequences = True

    def matches(self, model: nn.Module) -> bool:
        return is_reward_model(model)

    def hidden_at_targets(self, model: nn.Module, batch: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Final hidden states ``(2B, H)`` at ``batch["last_index"]`` (chosen then rejected), no extras.

        Raises:
            ValueError: the batch has no ``last_index`` (not laid out by ``collate_pairs``).
        """
        if "last_index" not in batch:
            raise ValueError("value-head model: the batch has no last_index; lay it out with "
                             "preftune.engine.layout.collate_pairs")
        body = body_of(model)
        kwargs = attention_inputs(model, batch)
        hidden = body(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["last_index"]), {}

    def head(self, model: nn.Module) -> nn.Module:
        """The value head ``score`` (``(..., H) -> (..., 1)``; peft's trained copy when wrapped)."""
        body_of(model)  # checks num_labels
        return getattr(_base(model), HEAD_NAME)


VALUE_HEAD = register_kind(ValueHeadKind(), first=True)
