"""Engine switches that act inside the forward (attention kernel, memory budget, speed paths).

The layout switches (``--share_prompt`` ...) act in the collator; these act in
:func:`preftune.engine.logprobs.sequence_logps` and the attention function, which see only the
model and the batch. :func:`configure_engine` stores them on the model (on every submodule that has
a ``config``, so a vision model's language model finds them too); :func:`engine_options` reads
them (defaults when never configured).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from torch import nn

_ATTR = "_preftune_engine_options"
PACKED_ATTENTION = ("blockwise", "mask")


@dataclass(frozen=True)
class EngineOptions:
    """See the help of the flags of the same names (:class:`preftune.config.EngineArguments`)."""

    packed_attention: str = "blockwise"
    max_activation_memory_gb: Optional[float] = 2.0
    malloc_trim: bool = True
    malloc_trim_threshold_mb: float = 256.0
    compile_layers: bool = False
    fused_lm_head: bool = False
    fused_lora: bool = False
    #: the device whose attention paths the engine takes (None: the batch's device); forcing "cuda"
    #: on a CPU runs the GPU choice (:func:`preftune.engine.attention.attention_path`) in tests
    attention_device: Optional[str] = None

    def __post_init__(self) -> None:
        if self.attention_device not in (None, "cpu") and not str(self.attention_device).startswith("cuda"):
            raise ValueError(f"attention_device must be None, 'cpu' or 'cuda[:N]', got {self.attention_device!r}")
        if self.packed_attention not in PACKED_ATTENTION:
            raise ValueError(f"--packed_attention must be one of {', '.join(PACKED_ATTENTION)}, "
                             f"got {self.packed_attention!r}")
        if not self.malloc_trim_threshold_mb >= 0:
            raise ValueError(f"--malloc_trim_threshold_mb must be >= 0, got {self.malloc_trim_threshold_mb}")
        budget = self.max_activation_memory_gb
        if budget is not None and not (budget > 0 or math.isinf(budget)):
            raise ValueError(f"--max_activation_memory_gb must be > 0 (inf: no limit), got {budget}")


DEFAULT = EngineOptions()


def engine_options(module: nn.Module) -> EngineOptions:
    """The options stored on ``module`` by :func:`configure_engine`, else the defaults."""
    return getattr(module, _ATTR, DEFAULT)


def configure_engine(model: nn.Module, options: Optional[EngineOptions] = None,
                     router_aux_loss_coef: Optional[float] = None, **changes) -> EngineOptions:
    """Set ``model`` up for the engine: store ``options`` (default: the current ones) with ``changes``
    applied on it, and ``--router_aux_loss_coef`` (mixture of experts, recorded by
    :func:`preftune.engine.kinds.moe.configure_router_aux`; None: the model config decides).
    Returns the options.

    ``changes`` are :class:`EngineOptions` field names; an
    :class:`~preftune.config.EngineArguments` can be passed as ``options`` (its fields of the same
    names are taken).

    Raises:
        ValueError: a bad option value, or a bad ``router_aux_loss_coef`` (non-finite, negative, or
            > 0 for a model without router logits), checked before anything is stored.
        TypeError: an unknown option name.
    """
    from preftune.engine.kinds.moe import configure_router_aux

    configure_router_aux(model, router_aux_loss_coef)
    if options is None:
        options = engine_options(model)
    elif not isinstance(options, EngineOptions):
        names = {f.name for f in dataclasses.fields(EngineOptions)}
        options = EngineOptions(**{k: getattr(options, k) for k in names if hasattr(options, k)})
    options = dataclasses.replace(options, **changes)
    for module in model.modules():
        if module is model or hasattr(module, "config"):
            setattr(module, _ATTR, options)
    return options
