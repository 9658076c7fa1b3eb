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

    def __post_init__(self) -> None:
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


def configure_engine(model: nn.Module, options: Optional[EngineOptions] = None, **changes) -> EngineOptions:
    """Store ``options`` (default: the current ones) with ``changes`` applied on ``model``; returns them.

    ``changes`` are :class:`EngineOptions` field names; an
    :class:`~preftune.config.EngineArguments` can be passed as ``options`` (its fields of the same
    names are taken). Raises ``ValueError`` for a bad value, ``TypeError`` for an unknown name.
    """
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
