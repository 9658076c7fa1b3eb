"""``--deepspeed zero0|zero1|zero2|zero3|zero2_offload|zero3_offload``: ms-swift's names for its bundled
DeepSpeed configurations, written by preftune as JSON files (``transformers``' ``"auto"`` values
for everything the training arguments decide) and passed on as ``--deepspeed FILE``.

The configurations follow what the names mean in ms-swift (``swift/config/zero*.json``, read, not
copied): ZeRO stage 0-3, optimizer states (and for stage 3 the parameters) offloaded to the CPU for
``*_offload``, fp16 / bf16 as the training arguments say. DeepSpeed is an optional extra: without
the ``deepspeed`` package, the run trains without it and says so in one line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile

from preftune.errors import ConfigError

from .base import Context, one

ZERO_NAMES = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")


def zero_config(name: str) -> dict:
    """The DeepSpeed configuration that ``name`` (one of :data:`ZERO_NAMES`) stands for.

    Raises:
        ConfigError: ``name`` is not one of :data:`ZERO_NAMES`.
    """
    if name not in ZERO_NAMES:
        raise ConfigError(f"--deepspeed {name!r}: not one of ms-swift's names ({', '.join(ZERO_NAMES)}) nor a file")
    stage = int(name[4])
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage in (1, 2):
        zero.update(allgather_partitions=True, allgather_bucket_size=2e8, reduce_scatter=True, reduce_bucket_size=2e8)
    if stage == 3:
        zero.update(sub_group_size=1e9, reduce_bucket_size="auto", stage3_prefetch_bucket_size="auto",
                    stage3_param_persistence_threshold="auto", stage3_max_live_parameters=1e9,
                    stage3_max_reuse_distance=1e9, stage3_gather_16bit_weights_on_model_save=True)
    if name.endswith("_offload"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                     "hysteresis": 2, "min_loss_scale": 1},
            "bf16": {"enabled": "auto"}, "zero_optimization": zero, "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "steps_per_print": 2000, "wall_clock_breakdown": False}


def write_zero_config(name: str, folder: str = "") -> str:
    """Write :func:`zero_config` ``(name)`` to ``<folder>/ds_<name>.json`` (default: a ``preftune-deepspeed``
    folder in the temporary directory), atomically; returns the path."""
    folder = folder or os.path.join(tempfile.gettempdir(), "preftune-deepspeed")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"ds_{name}.json")
    handle, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        json.dump(zero_config(name), out, indent=1)
    os.replace(tmp, path)
    return path


def deepspeed_available() -> bool:
    """The ``deepspeed`` package is importable."""
    return importlib.util.find_spec("deepspeed") is not None


def convert_deepspeed(name: str, given: list[str], ctx: Context) -> list[str]:
    """Converter of preftune's own ``--deepspeed`` (a noted alias): a swift name becomes a written
    configuration file when DeepSpeed is installed, or is dropped with one line saying what the run
    falls back to; a file path is kept as given."""
    value = one(name, given)
    if value not in ZERO_NAMES:
        return [f"--{name}", value]
    if not deepspeed_available():
        ctx.notes.append(f"--{name} {value}: the deepspeed package is not installed here (pip install deepspeed); "
                         "training without DeepSpeed: plain data parallel over the launched processes, "
                         "one process otherwise")
        return []
    path = write_zero_config(value)
    ctx.notes.append(f"--{name} {value} → --deepspeed {path} (ms-swift's {value} configuration, written by preftune)")
    return [f"--{name}", path]
