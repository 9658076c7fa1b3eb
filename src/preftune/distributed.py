"""Several processes (``torchrun`` / ``accelerate launch``): global batch counts, metrics over ranks,
the engine inside a wrapped model's forward, a length-grouped sampler for the global batch.

The training loop stays ``transformers.Trainer``'s (DDP, FSDP and DeepSpeed through accelerate).
What preference optimisation adds, and this module provides:

* **Global normalisers** (:class:`GlobalCounts`, :func:`global_counts`): the NLL term of CPO /
  SimPO / RPO / SFT is a token mean over the chosen completions of the *whole* batch. With
  gradient accumulation and several ranks a micro-batch sees only part of that batch, so the
  number of pairs ``N`` and of chosen completion tokens ``T`` of one optimizer step are counted
  over all its micro-batches and all-reduced over the ranks (one all-reduce of two numbers per
  step), as ``transformers`` counts ``num_items_in_batch``. Each micro-batch's loss is then
  ``W * (sum_i term_i / N + alpha * sum_i nll_sum_i / T)`` for ``W`` ranks: DDP / FSDP / ZeRO
  average the gradients over ranks and the Trainer sums the micro-batches, so the update is the
  gradient of the full-batch loss whatever the split (see :meth:`PreferenceTrainer.compute_loss`).
* **Metrics over ranks** (:func:`reduce_stored_metrics`): the per-micro-batch metric values of
  every rank are summed with one ``all_gather_object`` per log, so the logged value is the mean
  over all ranks' micro-batches and is logged once (by the main process).
* **The engine inside the forward** (:func:`forward_through`): the engine calls the decoder and
  the LM head itself. Under DDP the reducer is armed by the wrapper's forward, under FSDP2 the
  root module's parameters (the LM head, tied embeddings) are gathered by the root's forward
  hooks, under FSDP1 / DeepSpeed by the wrapper: calling the submodules directly would skip that.
  So the engine runs *as* the wrapped module's forward for one call.
* **Sampling** (:class:`GlobalLengthGroupedSampler`): accelerate deals the batches of one index
  sequence round-robin to the ranks, so a sampler that groups by length must group the pairs of
  one *global* step (``per_device × accumulation × ranks``) and must produce the same sequence
  on every rank (a seeded generator, reseeded per epoch).
* **Splitting work** (:func:`shard`, :func:`gather_objects`): the reference log-probs are
  computed once, each rank a share, then gathered.

Without a process group every helper is the single-process identity (world size 1).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

# ---- process group -------------------------------------------------------------------------------


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
    from preftune.config import ConfigError

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


# ---- global counts of one optimizer step ---------------------------------------------------------


@dataclass(frozen=True)
class GlobalCounts:
    """What one optimizer step holds over all its micro-batches and all ranks.

    ``pairs``: preference pairs ``N``; ``chosen_tokens``: scored chosen-completion tokens ``T``;
    ``world_size``: the ranks ``W`` whose gradients DDP / FSDP / ZeRO average. Passed by the
    trainer as ``num_items_in_batch``.
    """

    pairs: float
    chosen_tokens: float
    world_size: int = 1

    def share(self, batch_pairs: int) -> float:
        """The weight of a micro-batch of ``batch_pairs`` pairs in the rank-averaged update:
        ``W * batch_pairs / N`` (1 when the micro-batch is the whole global batch)."""
        return self.world_size * batch_pairs / self.pairs


def batch_counts(batch: dict[str, Any]) -> tuple[int, int]:
    """``(pairs, chosen completion tokens)`` of one laid-out batch (:func:`collate_pairs`:
    ``num_pairs`` and the targets whose ``target_seq < num_pairs``)."""
    pairs = int(batch["num_pairs"])
    seq = batch.get("target_seq")
    tokens = int((seq < pairs).sum()) if isinstance(seq, torch.Tensor) else 0
    return pairs, tokens


def global_counts(batches: Sequence[dict[str, Any]], device: Optional[torch.device] = None) -> Optional[GlobalCounts]:
    """:class:`GlobalCounts` of the micro-batches of one optimizer step on this rank, summed over
    all ranks (one all-reduce of two float64 numbers; every rank must call it, at the same step).
    None when no rank holds a pair (an exhausted epoch)."""
    local = [0, 0]
    for b in batches:
        p, t = batch_counts(b)
        local[0] += p
        local[1] += t
    totals = [float(v) for v in local]
    w = world_size()
    if w > 1:
        dev = device if device is not None else torch.device("cpu")
        if torch.distributed.get_backend() == "nccl" and dev.type == "cpu":
            dev = torch.device("cuda", torch.cuda.current_device())
        totals = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=dev)).tolist()
    if totals[0] <= 0:
        return None
    return GlobalCounts(pairs=totals[0], chosen_tokens=max(totals[1], 1.0), world_size=w)


# ---- metrics over ranks --------------------------------------------------------------------------


def reduce_stored_metrics(stored: dict[str, list[float]], counters: Optional[dict[str, float]] = None
                          ) -> tuple[dict[str, float], dict[str, float]]:
    """Means of the stored per-micro-batch metric values over all ranks, and sums of ``counters``.

    ``stored``: metric name → this rank's values since the last log; ``counters``: name → this
    rank's running count (e.g. tokens seen). Returns ``(means, sums)``: each mean is taken over
    every rank's values (a metric missing on some rank is averaged over the values there are);
    each sum over the ranks. One ``all_gather_object`` when a process group is initialised:
    every rank must call it at the same point (the Trainer logs on every rank).
    """
    local = {k: (float(sum(v)), len(v)) for k, v in stored.items() if v}
    counters = dict(counters or {})
    if is_distributed():
        gathered = gather_objects((local, counters))
    else:
        gathered = [(local, counters)]
    totals: dict[str, list[float]] = {}
    sums: dict[str, float] = {}
    for values, counts in gathered:
        for k, (s, n) in values.items():
            acc = totals.setdefault(k, [0.0, 0])
            acc[0] += s
            acc[1] += n
        for k, v in counts.items():
            sums[k] = sums.get(k, 0) + v
    return {k: s / n for k, (s, n) in totals.items() if n}, sums


# ---- the engine inside the wrapped model's forward ----------------------------------------------

_WRAPPERS = ("DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine", "DataParallel",
             "OptimizedModule")


def inner_module(model: nn.Module) -> nn.Module:
    """The module a data-parallel / sharding wrapper holds (DDP, FSDP1, DeepSpeed, DataParallel,
    ``torch.compile``), unwrapped repeatedly; ``model`` itself when it is not wrapped (FSDP2
    ``fully_shard`` modifies the module in place: it is its own root)."""
    m = model
    while type(m).__name__ in _WRAPPERS:
        m = getattr(m, "module", None) or getattr(m, "_orig_mod", None)
        if m is None:
            return model
    return m


def forward_through(model: nn.Module, fn: Callable[[nn.Module], Any]) -> Any:
    """``fn(inner)`` run as the forward of ``model``'s wrapped module, through ``model.__call__``.

    The wrapper (DDP: reducer bookkeeping, FSDP1 / DeepSpeed: parameter gathering) and the
    module's own forward hooks (FSDP2 root: all-gather of the root-owned parameters such as the
    LM head; ZeRO-3: per-module gathering) run as for an ordinary forward, so the engine, which
    calls the decoder and the LM head directly, sees full parameters and arms the gradient
    reduction. ``fn``'s result should be a tensor or a dict / tuple of tensors (DDP looks for
    the tensors of the output). For an unwrapped module without hooks this is ``fn(model)``.
    """
    inner = inner_module(model)
    missing = object()
    previous = inner.__dict__.get("forward", missing)  # accelerate may have put an autocast forward there

    def forward(*args, **kwargs):
        return fn(inner)

    inner.forward = forward
    try:
        return model()
    finally:
        if previous is missing:
            del inner.forward
        else:
            inner.forward = previous


# ---- sampling ------------------------------------------------------------------------------------


class GlobalLengthGroupedSampler(torch.utils.data.Sampler):
    """Length-grouped order of a dataset, the same on every rank (seeded, reseeded per epoch).

    Indices are permuted by a generator seeded with ``seed + epoch``, cut into mega-batches of
    ``mega_batch_mult * group_size`` (as transformers' ``get_length_grouped_indices``, default
    ``mult = min(len // (4 * group_size), 50)``, at least 1), each sorted by length, longest
    first, and the mega-batch holding the longest item goes first (an out-of-memory shows at
    once). ``group_size``: pairs of one *global* step, ``per_device × accumulation × ranks``,
    so that accelerate, which deals consecutive ``per_device`` batches round-robin to the ranks,
    gives every rank a micro-batch of similar lengths and every step a different set of pairs.

    Args:
        lengths: ``(n,)`` item lengths (tokens).
        group_size: items per global step (> 0).
        seed: base seed (``--data_seed`` else ``--seed``).
    """

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int = 0, mega_batch_mult: Optional[int] = None):
        if group_size <= 0:
            raise ValueError(f"preftune.distributed: group_size must be > 0, got {group_size}")
        self.lengths = list(lengths)
        self.group_size = int(group_size)
        self.seed = int(seed)
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        if not self.lengths:
            return iter(())
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, self.mega_batch_mult, generator=g))
