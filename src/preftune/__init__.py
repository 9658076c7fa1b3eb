"""preftune: preference-optimisation fine-tuning for causal language models.

Python entry points (loaded on first use, so ``import preftune`` stays cheap — no torch):

* ``preftune.train(config, **overrides)`` — ``preftune train`` from Python; ``config`` is a dict of
  flag names to values, a YAML path or the configuration groups. Returns a
  :class:`preftune.train.TrainResult` ``(output_dir, metrics)``.
* ``preftune.trl`` — TRL-shaped trainers: ``from preftune.trl import DPOConfig, DPOTrainer`` (also CPO,
  ORPO and Reward), see ``docs/python-api.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("train", "trl")
__all__ = ["__version__", *_LAZY_SUBMODULES]


def __getattr__(name: str) -> Any:
    # ``preftune.train`` is the submodule preftune/train.py, made callable (it forwards to
    # ``run_config``): importing a submodule binds it on the package under its name anyway.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
