"""Process group facts and accelerate / FSDP / DeepSpeed set-up on CPU (:mod:`preftune.distributed`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from preftune.errors import ConfigError

# ---- process group -------------------------------------------------------------------------------


def is_main_process() -> bool:
    """True on the process that writes (rank 0 under ``torchrun`` / ``accelerate launch``), from ``$RANK``."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group with more than one rank is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def world_size() -> int:
    """Ranks of the initialised process group (1 without one)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the initialised process group (0 without one)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def launched_world_size() -> int:
    """``$WORLD_SIZE`` as set by ``torchrun`` / ``accelerate launch`` (1 when not launched so),
    known before any process group exists."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def has_accelerator() -> bool:
    """True when torch sees a GPU (CUDA / ROCm) or another accelerator (XPU, MPS, NPU ...)."""
    if torch.cuda.is_available():
        return True
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        try:
            return bool(acc.is_available())
        except Exception:  # an accelerator backend that fails to initialise: treat as none
            return False
    return False


@contextlib.contextmanager
def preserved_accelerate_state():
    """Keep accelerate's process-wide state across the block.

    Every ``TrainingArguments(...)`` resets and rebuilds accelerate's shared ``PartialState`` /
    ``AcceleratorState`` from *its own* fields; building a throw-away instance (e.g. to read the
    defaults) would replace the run's distributed setup (backend, DeepSpeed, FSDP) with the
    defaults'. The shared dicts are saved and put back.
    """
    try:
        from accelerate.state import AcceleratorState, PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        yield
        return
    saved = [(cls._shared_state, dict(cls._shared_state)) for cls in (PartialState, AcceleratorState)]
    try:
        yield
    finally:
        for shared, values in saved:
            shared.clear()
            shared.update(values)


def enable_fsdp_on_cpu(accelerator, training_args) -> bool:
    """``--fsdp`` with several processes on CPUs (gloo): turn accelerate's state to FSDP.

    accelerate (1.x) enables its FSDP plugin only for GPU-type backends; on a multi-process CPU
    run it silently falls back to DDP (every rank holding the whole model). FSDP2's
    ``fully_shard`` itself works on CPU tensors over gloo, so when ``--fsdp`` was given, the
    run has several processes, no GPU, and accelerate chose ``MULTI_CPU``, the state is switched
    to ``FSDP`` with the plugin built from the same arguments transformers built it from. True
    when it was switched (the Trainer must then treat FSDP as enabled).
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin_args = getattr(training_args, "fsdp_plugin_args", None)
    state = accelerator.state
    if plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU or has_accelerator():
        return False
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    from accelerate.state import PartialState

    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # every AcceleratorState() copies PartialState's fields over its own: switch both, as accelerate does
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if state.is_main_process:
        logging.getLogger("preftune.distributed").info(
            "--fsdp with %d CPU processes: accelerate's state switched to FSDP (it would fall back to DDP)",
            state.num_processes)
    return True


def complete_deepspeed_cpu_state(training_args) -> bool:
    """``--deepspeed`` with several processes on CPUs: give accelerate the ranks DeepSpeed has.

    With ``--deepspeed`` transformers asks accelerate for a DeepSpeed state without a backend;
    accelerate finds a backend only for GPU-type devices, so on CPUs its state says one process,
    rank 0, on every rank (each would write the outputs, and "auto" batch sizes would count one
    process), although DeepSpeed's own process group (gloo) spans them all. The rank, the number of
    processes and the backend are taken from the initialised ``torch.distributed`` group. True when
    the state was completed. Called right after the device setup, before transformers fills the
    DeepSpeed configuration.
    """
    if not getattr(training_args, "deepspeed", None) or has_accelerator() or launched_world_size() <= 1:
        return False
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from accelerate.state import PartialState

    shared = PartialState._shared_state
    if shared.get("num_processes", 1) > 1:
        return False
    shared.update(num_processes=torch.distributed.get_world_size(), process_index=torch.distributed.get_rank(),
                  local_process_index=int(os.environ.get("LOCAL_RANK", "0") or 0),
                  backend=torch.distributed.get_backend())
    return True


@contextlib.contextmanager
def full_parameters(model: nn.Module):
    """The whole model's parameters on every rank for the block, before any wrapper exists.

    Under DeepSpeed ZeRO-3 the weights are partitioned while they load (each rank holds a slice;
    the hooks that gather them are installed only when the Trainer builds the engine), so a
    forward run before training (the reference log-probs) gathers them all first
    (``deepspeed.zero.GatheredParameters``, collective: every rank enters the block) and they
    are partitioned again after it. Parameters left on the ``meta`` device (FSDP's
    ``cpu_ram_efficient_loading`` on the non-main ranks) cannot be run: :class:`ConfigError`
    naming the setting. Otherwise nothing happens.
    """

    params = list(model.parameters())
    if any(p.is_meta for p in params):
        raise ConfigError("preftune.distributed: the model's weights are on the meta device on this rank (FSDP "
                           "cpu_ram_efficient_loading): a forward before training (--precompute_ref_log_probs) "
                           "needs them; set fsdp_cpu_ram_efficient_loading false")
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


# ---- splitting work ------------------------------------------------------------------------------


def shard(items: Sequence[Any], num_shards: Optional[int] = None, index: Optional[int] = None) -> list[Any]:
    """The share of ``items`` of rank ``index`` out of ``num_shards`` (default: this rank of the
    process group): every ``num_shards``-th item from ``index`` (lengths differ by at most one)."""
    n = world_size() if num_shards is None else num_shards
    i = rank() if index is None else index
    return list(items[i::n])


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``all_gather_object``; picklable
    objects). ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over all ranks (a new tensor; ``values`` itself without a process group)."""
    if not is_distributed():
        return values
    out = values.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out
