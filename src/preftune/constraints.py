"""The range of every number a flag, YAML key or ``preftune.trl`` config field takes, checked in one place.

:data:`RANGES` is the one table of constraints: the configuration groups (:mod:`preftune.config`),
the training arguments (:class:`preftune.cli_args.PreftuneTrainingArguments`) and so the TRL configs
call :func:`check_numbers` first in their ``__post_init__``, before anything loads. A field not in
the table that holds a float must still be finite (no ``nan`` / ``inf`` reaches the training).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

from preftune.errors import ConfigError


class Range(NamedTuple):
    """Allowed values: ``low`` (``>=`` or ``>``) and ``high`` (``<=`` or ``<``); ``inf`` allowed or not."""

    low: Optional[float] = None
    low_open: bool = False
    high: Optional[float] = None
    high_open: bool = False
    inf_ok: bool = False  # +inf is a meaningful value ("no limit")

    def text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return "a finite number"

    def allows(self, value: float) -> bool:
        if math.isnan(value) or (math.isinf(value) and not (self.inf_ok and value > 0)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


_POSITIVE, _NON_NEGATIVE, _FINITE = Range(0, True), Range(0), Range()
_UNIT_OPEN = Range(0, False, 1, True)  # [0, 1)

RANGES: dict[str, Range] = {
    # peft / data
    "lora_dropout": _UNIT_OPEN,
    "eval_ratio": _UNIT_OPEN,
    # loss
    "beta": _POSITIVE,
    "loss_weights": _FINITE,
    "f_alpha_divergence_coef": _FINITE,
    "discopop_tau": _POSITIVE,
    "ld_alpha": Range(0, False, 1, False),
    "ref_model_mixup_alpha": Range(0, False, 1, False),
    "ref_model_sync_steps": Range(1),
    "desirable_weight": _POSITIVE,
    "undesirable_weight": _POSITIVE,
    "alpha": _FINITE,
    "label_smoothing": Range(0, False, 0.5, True),
    "cpo_alpha": _NON_NEGATIVE,
    "simpo_gamma": _FINITE,
    "rpo_alpha": _NON_NEGATIVE,
    "center_rewards_coefficient": _NON_NEGATIVE,
    "router_aux_loss_coef": _NON_NEGATIVE,
    # engine
    "max_activation_memory_gb": Range(0, True, inf_ok=True),
    "malloc_trim_threshold_mb": Range(0, inf_ok=True),
    # transformers.TrainingArguments (the floats users set)
    "learning_rate": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE,
    "max_grad_norm": _NON_NEGATIVE,
    "warmup_ratio": Range(0, False, 1, False),
    "warmup_steps": _NON_NEGATIVE,
    "adam_beta1": _UNIT_OPEN,
    "adam_beta2": _UNIT_OPEN,
    "adam_epsilon": _NON_NEGATIVE,
    "label_smoothing_factor": _UNIT_OPEN,
    "num_train_epochs": _NON_NEGATIVE,
    "neftune_noise_alpha": _NON_NEGATIVE,
    "logging_steps": _POSITIVE,
    "save_steps": _POSITIVE,
    "eval_steps": _POSITIVE,
    "eval_delay": _NON_NEGATIVE,
}


def check_number(name: str, value, prefix: str = "") -> None:
    """Raise :class:`ConfigError` (one line: the flag, the allowed range, the value) when ``value``
    (a number, or a list of numbers) is outside :data:`RANGES`' entry for ``name`` or, for a float
    without an entry, not finite. ``None``, booleans and non-numbers are left alone."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        allowed = RANGES.get(name, _FINITE)
        if not allowed.allows(float(item)):
            what = allowed.text()
            what = what if what == "a finite number" else f"{what} (a finite number{'; inf allowed' if allowed.inf_ok else ''})"
            raise ConfigError(f"{prefix}--{name} must be {what}, got {item}")


def check_numbers(obj, prefix: str = "") -> None:
    """:func:`check_number` for every init field of the dataclass ``obj``."""
    for f in dataclasses.fields(obj):
        if f.init and not f.name.startswith("_"):
            check_number(f.name, getattr(obj, f.name, None), prefix)
