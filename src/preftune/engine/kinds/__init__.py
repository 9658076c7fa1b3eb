"""Model kinds: one module per kind of model, one dispatch, the only seam between a model and preftune.

Every kind (:class:`preftune.engine.kinds.base.ModelKind` lists the members and gives the answers of
a decoder-only LM) answers in its own module:

* which transformers class loads it, from its config before any weights are read (``auto_class``,
  ``processing_class``, ``check_config``, ``load_kwargs``, ``loading``);
* how pairs become rows (``collate``) and how a laid-out batch is scored (``score``:
  :class:`preftune.types.PolicyLogps` from the LM head, or :class:`preftune.types.PairRewards` from a
  value head), with the extra loss terms and their weights (MoE router loss);
* how text is tokenised for it (``tokenize_options``), what the training data needs
  (``prepare_data``), what a loaded model needs from its tokenizer (``ready``);
* PEFT: ``peft_task_type``, ``modules_to_save``, ``lora_targets``, ``default_lora_targets``;
  what ``--freeze_vision_tower`` freezes (``freezable_parameters``); what is saved next to the
  weights (``save_extras``).

:data:`ORDER` is the one registration list: the kinds are tried in that order, the first whose
``matches(model)`` (:func:`kind_for`) or ``matches_config(config)`` (:func:`kind_for_config`) is true
wins. A new kind is one module with a ``KIND`` instance and its name in :data:`ORDER`
(``../shared/design/model-kinds.md``). Mixture-of-experts decoders are a causal extra
(:mod:`preftune.engine.kinds.moe`).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from torch import nn

from preftune.errors import UnsupportedModelError

# more specific kinds first, plain causal LMs (the fallback) last
ORDER = ("value_head", "seq2seq", "vision", "causal")


@functools.cache
def kinds() -> tuple:
    """The kind instances (each module's ``KIND``), in :data:`ORDER`."""
    return tuple(importlib.import_module(f"{__name__}.{name}").KIND for name in ORDER)


def kind_for(model: nn.Module):
    """The kind of ``model`` (peft-wrapped or not), bound to it (``kind.bound(model)``: an
    encoder–decoder kind carries the model's decoder start and packing facts for ``collate``).

    Raises:
        UnsupportedModelError: no kind supports the model (message: model class,
            ``config.model_type`` and the supported kinds).
    """
    for kind in kinds():
        if kind.matches(model):
            return kind.bound(model)
    from preftune.modeling import unwrap_peft

    base = unwrap_peft(model)
    model_type = getattr(getattr(base, "config", None), "model_type", "?")
    raise UnsupportedModelError(
        f"{type(base).__name__} (model_type {model_type!r}) is not supported by any preftune model kind; "
        f"supported: {', '.join(k.name for k in kinds())}")


def kind_for_config(config: Any, *, reward_model: bool = False, name: str | None = None):
    """The kind that loads a model with ``config`` (a transformers ``PretrainedConfig``, or None when
    it cannot be read: the causal kind, whose loader then reports why), checked against the config
    before any weights are read; ``kind.auto_class`` names the transformers class.

    ``reward_model``: the model is loaded as a reward model (value head; ``--loss rm``).
    ``name``: the ``--model_name_or_path`` the messages name.

    Raises:
        UnsupportedModelError: the kind refuses the config (an encoder-only model, a vision–language
            family preftune does not cover, an encoder–decoder or vision–language reward model).
    """
    for kind in kinds():
        if kind.matches_config(config, reward_model=reward_model):
            kind.check_config(config, name)
            return kind
    raise UnsupportedModelError(f"--model_name_or_path {name}: no preftune model kind loads it")  # pragma: no cover


def collate_for(model: nn.Module, pad_token_id: int | None = None):
    """``kind_for(model).collate``, with ``pad_token_id`` bound when given (a collate function with
    :func:`preftune.engine.layout.collate_pairs`' keywords)."""
    collate = kind_for(model).collate
    return collate if pad_token_id is None else functools.partial(collate, pad_token_id=pad_token_id)
