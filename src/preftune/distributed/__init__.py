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

from preftune.distributed.process import (  # noqa: F401
    all_reduce_sum,
    complete_deepspeed_cpu_state,
    enable_fsdp_on_cpu,
    full_parameters,
    gather_objects,
    has_accelerator,
    is_distributed,
    is_main_process,
    launched_world_size,
    preserved_accelerate_state,
    rank,
    shard,
    world_size,
)
from preftune.distributed.steps import (  # noqa: F401
    GlobalCounts,
    GlobalLengthGroupedSampler,
    batch_counts,
    forward_through,
    global_counts,
    inner_module,
    reduce_stored_metrics,
)
