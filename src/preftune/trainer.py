"""The preference trainer: :class:`transformers.Trainer` with preftune's engine and losses.

Everything about the training loop (optimiser, schedulers, gradient accumulation, checkpoints
and ``resume_from_checkpoint``, ``report_to``, DeepSpeed/FSDP through accelerate) is the
Trainer's. This module adds only what is specific to preference optimisation:

* the collator that lays out pairs for the engine (:func:`preftune.engine.layout.collate_pairs`);
* ``compute_loss``: one decoder pass for chosen and rejected (:func:`sequence_logps`), reference
  log-probs from the batch (precomputed) or from the reference policy, and the loss from the
  name → function table (:func:`preftune.losses.compute_loss`);
* metrics with TRL's names, averaged over the logging window and written to ``log_history``.

Several processes (``torchrun`` / ``accelerate launch``, DDP, FSDP, DeepSpeed; :mod:`preftune.distributed`):
the loss of each micro-batch is its share of the *global* batch loss (pairs and NLL tokens counted
over all micro-batches of the step and all ranks, :meth:`PreferenceTrainer.get_batch_samples`), so
the update does not depend on how the batch is split; the engine runs inside the wrapped model's
forward; logged metrics are means over all ranks, logged once.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch.utils.data import Dataset
from transformers import Trainer

from preftune.config import ConfigError, EngineArguments, LossArguments, resolve_reference_options
from preftune.distributed import (
    GlobalCounts,
    GlobalLengthGroupedSampler,
    forward_through,
    global_counts,
    inner_module,
    reduce_stored_metrics,
)
from preftune.engine.layout import collate_pairs
from preftune.engine.logprobs import sequence_logps
from preftune.engine.rewards import sequence_rewards
from preftune.guard import GuardedTrainerMixin
from preftune.losses import compute_loss as loss_from_table
from preftune.outputs import CrashSafeCheckpointMixin
from preftune.types import PairRewards, PolicyLogps, TokenizedPair

_HONOURS_SCALED_LOSS = hasattr(Trainer, "loss_is_scaled_for_ga")  # transformers decides GA scaling from it


def _fields(record) -> dict[str, Any]:
    """A dataclass's fields as a shallow dict (a wrapper's forward returns dicts of tensors)."""
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


class PairDataset(Dataset):
    """A list of :class:`TokenizedPair` as a torch ``Dataset`` (items are the pairs themselves)."""

    def __init__(self, pairs: list[TokenizedPair]):
        self.pairs = pairs
        for i, pair in enumerate(pairs):  # carried by the batch (record_index), named in guard messages
            pair.record_index = i

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> TokenizedPair:
        return self.pairs[i]


class PairCollator:
    """Collate :class:`TokenizedPair` items with the engine's layout switches.

    ``model``: when given, the layout of its kind (:func:`preftune.engine.layout_seq2seq.collate_for`:
    encoder and decoder rows for an encoder–decoder model); else :func:`collate_pairs`.
    """

    def __init__(self, engine_args: EngineArguments, pad_token_id: int, model: Optional[torch.nn.Module] = None):
        from preftune.engine.layout_seq2seq import collate_for

        self.engine_args = engine_args
        self.pad_token_id = pad_token_id
        self.collate = collate_pairs if model is None else collate_for(model)

    def __call__(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        e = self.engine_args
        return self.collate(pairs, share_prompt=e.share_prompt, padding_free=e.padding_free,
                            max_tokens_per_batch=e.max_tokens_per_batch, pad_token_id=self.pad_token_id)


def preference_metrics(logps: PolicyLogps, out) -> dict[str, torch.Tensor]:
    """Batch-mean metrics with TRL's names from a :class:`LossOutput` (detached scalars)."""
    chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
    }
    metrics.update({k: v.detach().float() for k, v in out.metrics.items()})
    return metrics


class PreferenceTrainer(GuardedTrainerMixin, CrashSafeCheckpointMixin, Trainer):
    """``transformers.Trainer`` for preference pairs.

    With the non-finite guard (:mod:`preftune.guard`: ``--nan_policy``) and crash-safe checkpoints
    (:mod:`preftune.outputs`: written to a temporary directory, renamed when complete).

    Args:
        loss_args: which loss (:class:`LossArguments`).
        engine_args: the engine's layout switches (:class:`EngineArguments`).
        reference_context: a zero-argument callable returning a context manager under which
            ``model`` computes the reference policy (LoRA adapters disabled, or the starting
            adapter); used by the DPO family when the batch carries no precomputed reference
            log-probs. ``ref_model``: a separate frozen reference model instead.
        Other arguments are the Trainer's; ``train_dataset`` / ``eval_dataset`` are lists of
        :class:`TokenizedPair` (or :class:`PairDataset`).

    In training ``compute_loss`` returns ``W * (sum of this micro-batch's per-pair losses) / N``
    (``N`` pairs in the optimizer step over all ranks, ``W`` ranks; the NLL terms normalised by
    the step's chosen tokens): already scaled for accumulation (``loss_is_scaled_for_ga``), and
    DDP / FSDP / ZeRO's gradient averaging over ranks turns it into the full-batch gradient.
    """

    loss_is_scaled_for_ga = True  # compute_loss normalises by the whole step (get_batch_samples)

    def __init__(self, *args, loss_args: LossArguments, engine_args: EngineArguments,
                 reference_context: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                 ref_model: Optional[torch.nn.Module] = None, pad_token_id: int = 0, **kwargs):
        for key in ("train_dataset", "eval_dataset"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = PairDataset(kwargs[key])
        kwargs.setdefault("data_collator", PairCollator(engine_args, pad_token_id,
                                                        model=kwargs.get("model", args[0] if args else None)))
        # a reward model has no reference policy: ConfigError for a reference model or precompute flag
        resolve_reference_options(loss_args, engine_args,
                                  has_ref_model=ref_model is not None or reference_context is not None)
        super().__init__(*args, **kwargs)
        from preftune.engine.kinds.moe import configure_router_aux

        try:  # --router_aux_loss_coef: recorded on the model (None: its config decides)
            configure_router_aux(self.model, getattr(loss_args, "router_aux_loss_coef", None))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        from preftune.engine.options import configure_engine

        configure_engine(self.model, engine_args)  # attention kernel, activation budget, speed paths
        self.loss_args = loss_args
        self.engine_args = engine_args
        self.reference_context = reference_context
        self.ref_model = ref_model
        self._stored_metrics: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.logical_tokens_seen = 0

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from preftune.distributed import enable_fsdp_on_cpu

        if enable_fsdp_on_cpu(self.accelerator, self.args):  # --fsdp on CPUs: accelerate would use DDP
            self.is_fsdp_enabled = True

    # ---- sampling -------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        """``group_by_length``: pairs of similar length (tokens of ``[P C R]``) grouped per *global*
        step (``per_device × accumulation × ranks``), the same order on every rank
        (:class:`GlobalLengthGroupedSampler`); accelerate deals the batches to the ranks."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, PairDataset):
            lengths = [p.num_tokens_unique for p in dataset.pairs]
            args = self.args
            seed = args.data_seed if args.data_seed is not None else args.seed
            return GlobalLengthGroupedSampler(
                lengths, args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size),
                seed=seed)
        return super()._get_train_sampler(train_dataset)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step and their :class:`GlobalCounts` (pairs and chosen
        completion tokens over all of them and all ranks), passed on as ``num_items_in_batch``."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.world_size <= 1 and len(batch_samples) <= 1:  # the micro-batch is the step: its own mean
            return batch_samples, None
        return batch_samples, global_counts(batch_samples, device)

    def autocast_smart_context_manager(self, cache_enabled: Optional[bool] = True):
        """Mixed precision (``--bf16`` / ``--fp16``) around the whole loss computation.

        accelerate applies autocast by wrapping ``model.forward``; the engine calls the decoder and
        the LM head directly, so the autocast context is entered here instead.
        """
        if self.args.bf16 or self.args.fp16:
            return self.accelerator.autocast()
        return contextlib.nullcontext()

    # ---- loss -----------------------------------------------------------------------------------
    def _logps(self, model, batch) -> PolicyLogps:
        """:func:`sequence_logps` of ``model`` (wrapped by DDP / FSDP / DeepSpeed or not), run inside
        its forward (:func:`preftune.distributed.forward_through`)."""
        chunk = self.engine_args.logprob_chunk_size
        return PolicyLogps(**forward_through(model, lambda m: _fields(sequence_logps(m, batch, chunk))))

    def _reference_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self.ref_model is not None:
                ref = self._logps(self.ref_model, batch)
            elif self.reference_context is not None:
                with self.reference_context():
                    ref = self._logps(model, batch)
            else:
                raise RuntimeError(
                    f"--loss {self.loss_args.loss} needs reference log-probs: use LoRA (--use_peft), "
                    "--precompute_ref_log_probs, or give a reference model")
        return ref.chosen_logps.detach(), ref.rejected_logps.detach()

    def batch_loss_and_metrics(self, model, batch, counts: Optional[GlobalCounts] = None
                               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss (scalar) and metrics of one laid-out batch.

        ``counts``: the optimizer step's :class:`GlobalCounts`; the loss is then this batch's share
        ``W * sum_i loss_i / N`` (NLL normalised by the step's chosen tokens) instead of the batch
        mean. Scalar terms computed per batch (the MoE router loss) weigh ``W * B / N``.
        """
        if self.loss_args.is_reward_model:  # --loss rm: value-head rewards, TRL RewardTrainer's metrics
            rewards = PairRewards(**forward_through(model, lambda m: _fields(sequence_rewards(m, batch))))
            out = loss_from_table(rewards, self.loss_args)
            loss = out.losses.mean() if counts is None else out.losses.sum() * (counts.world_size / counts.pairs)
            return loss, dict(out.metrics)
        logps = self._logps(model, batch)
        if self.loss_args.needs_reference and logps.ref_chosen_logps is None:
            logps.ref_chosen_logps, logps.ref_rejected_logps = self._reference_logps(model, batch)
        if counts is None:
            out = loss_from_table(logps, self.loss_args)
            loss, share = out.losses.mean(), 1.0
        else:
            out = loss_from_table(logps, self.loss_args, num_pairs_total=counts.pairs,
                                  nll_normaliser=counts.chosen_tokens)
            loss, share = out.losses.sum() * (counts.world_size / counts.pairs), counts.share(out.losses.shape[0])
        metrics = preference_metrics(logps, out)
        aux = logps.extra_losses.get("aux_loss")
        if aux is not None:  # mixture of experts: + coef * router load balancing (engine/kinds/moe.py), as TRL
            from preftune.engine.kinds.moe import router_aux_coef

            loss = loss + (share * router_aux_coef(inner_module(model))) * aux.to(loss.dtype)
            metrics["aux_loss"] = aux.detach().float()
        return loss, metrics

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        """The loss of one micro-batch; in training with ``num_items_in_batch`` (the step's
        :class:`GlobalCounts`, from :meth:`get_batch_samples`) its share of the global batch loss."""
        counts = num_items_in_batch if isinstance(num_items_in_batch, GlobalCounts) and model.training else None
        loss, metrics = self.batch_loss_and_metrics(model, inputs, counts)
        if counts is not None and not _HONOURS_SCALED_LOSS:  # an older Trainer divides by the accumulation steps
            loss = loss * self.current_gradient_accumulation_steps
        finite = self.guard_batch(loss, metrics, inputs) if model.training else True  # raises under --nan_policy stop
        if model.training:
            self.logical_tokens_seen += int(inputs["num_logical_tokens"])
        if finite:  # a skipped batch's terms stay out of the logged means
            self._store(metrics, "train" if model.training else "eval")
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics = self.batch_loss_and_metrics(model, inputs)
        self._store(metrics, "eval")
        return loss.detach(), None, None

    # ---- metrics --------------------------------------------------------------------------------
    def _store(self, metrics: dict[str, torch.Tensor], split: str) -> None:
        for key, value in metrics.items():
            self._stored_metrics[split][key].append(float(value))

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Add the stored metrics (means over the window's micro-batches of *all* ranks: one
        ``all_gather_object`` under several processes, on every rank) and ``logical_tokens_seen``
        (summed over the ranks), then the Trainer's log (printed and reported by the main process)."""
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        means, sums = reduce_stored_metrics(self._stored_metrics.get(split, {}),
                                            {"logical_tokens_seen": self.logical_tokens_seen})
        for key, value in means.items():
            logs[prefix + key] = value
        self._stored_metrics.pop(split, None)
        if split == "train":
            logs["logical_tokens_seen"] = int(sums["logical_tokens_seen"])
        super().log(logs, start_time)

    def _finalize_training(self, *args, **kwargs):
        # the loss of steps after the last log: the mean over ranks of their (W-scaled) shares, as logged losses are
        if self.args.world_size > 1 and getattr(self, "_tr_loss", None) is not None:
            self._tr_loss = self.accelerator.reduce(self._tr_loss.detach().clone(), reduction="mean")
        return super()._finalize_training(*args, **kwargs)
