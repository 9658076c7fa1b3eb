"""One optimizer step over several ranks: global counts, metrics, the engine inside the wrapped forward, sampling (:mod:`preftune.distributed`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from preftune.distributed.process import all_reduce_sum, gather_objects, is_distributed, world_size

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

    The wrapper is called with one placeholder input (a 0-d tensor, ignored): DDP built with
    ``device_ids`` (every GPU run under accelerate) moves its inputs with ``_to_kwargs`` and takes
    the first of them, which fails on a call without inputs.
    """
    inner = inner_module(model)
    missing = object()
    previous = inner.__dict__.get("forward", missing)  # accelerate may have put an autocast forward there

    def forward(*args, **kwargs):
        return fn(inner)

    inner.forward = forward
    try:
        return model(torch.zeros(()))
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
