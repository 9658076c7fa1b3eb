"""The preference trainer: :class:`transformers.Trainer` with preftune's engine and losses.

Everything about the training loop (optimiser, schedulers, gradient accumulation, checkpoints
and ``resume_from_checkpoint``, ``report_to``, DeepSpeed/FSDP through accelerate) is the
Trainer's. This module adds only what is specific to preference optimisation:

* the collator that lays out pairs as the model's kind wants them (``kind_for(model).collate``);
* ``compute_loss``: the kind scores the batch in one pass for chosen and rejected (``kind.score``:
  per-sequence log-probs, or a reward model's rewards), reference log-probs come from the batch
  (precomputed) or from the reference policy, the loss from the loss table
  (:func:`preftune.losses.compute_loss`), plus the kind's extra loss terms with their weights;
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
    reduce_stored_metrics,
)
from preftune.engine.kinds import kind_for
from preftune.engine.layout import collate_pairs
from preftune.engine.options import configure_engine
from preftune.guard import GuardedTrainerMixin, check_nan_policy
from preftune.losses import compute_loss as loss_from_table
from preftune.outputs import CrashSafeCheckpointMixin
from preftune.ref_sync import setup_trainer
from preftune.types import PairRewards, PolicyLogps, TokenizedPair

_HONOURS_SCALED_LOSS = hasattr(Trainer, "loss_is_scaled_for_ga")  # transformers decides GA scaling from it


def _fields(record) -> dict[str, Any]:
    """A dataclass's fields as a shallow dict (a wrapper's forward returns dicts of tensors)."""
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


def _to_host(values: dict[str, Any]) -> dict[str, float]:
    """Scalars (0-d tensors or numbers) as Python floats with one device-to-host copy for all the tensors."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in values.items() if k not in tensors}
    if tensors:
        flat = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist()
        out.update(zip(tensors, flat))
    return {k: out[k] for k in values}


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

    @property
    def column_names(self) -> list[str]:
        """The rows' column names where the rows expose them (the TRL door's rows, ``row.keys()``: TRL's
        tokenised columns), else ``[]`` — ``datasets.Dataset``'s attribute, read by TRL scripts and tests."""
        first = self.pairs[0] if self.pairs else None
        return list(first.keys()) if hasattr(first, "keys") else []


class PairCollator:
    """Collate :class:`TokenizedPair` items with the engine's layout switches.

    ``model``: when given, the layout of its kind (``kind_for(model).collate``: e.g. encoder and
    decoder rows for an encoder–decoder model, image inputs for a vision–language model); else
    :func:`collate_pairs` (text, decoder-only).
    """

    def __init__(self, engine_args: EngineArguments, pad_token_id: int, model: Optional[torch.nn.Module] = None):
        self.engine_args = engine_args
        self.pad_token_id = pad_token_id
        self.collate = collate_pairs if model is None else kind_for(model).collate

    def __call__(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        e = self.engine_args
        batch = self.collate(pairs, share_prompt=e.share_prompt, padding_free=e.padding_free,
                             max_tokens_per_batch=e.max_tokens_per_batch, pad_token_id=self.pad_token_id)
        if pairs and pairs[0].label is not None:  # KTO examples: (B,) desirable labels (preftune.data.unpaired)
            batch["kto_labels"] = torch.tensor([bool(p.label) for p in pairs], dtype=torch.bool)
        return batch


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
        check_nan_policy(self.args)  # before training: --nan_policy skip_batch cannot work under DeepSpeed
        try:  # attention kernel, activation budget, speed paths; --router_aux_loss_coef (None: the config's)
            configure_engine(self.model, engine_args, router_aux_loss_coef=getattr(loss_args, "router_aux_loss_coef", None))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.loss_args = loss_args
        self.engine_args = engine_args
        self.reference_context = reference_context
        self.ref_model = self._prepare_reference(ref_model)
        self.ref_sync = setup_trainer(self)  # LD-DPO / WPO outputs, TR-DPO's reference updates (preftune.ref_sync)
        self._stored_metrics: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.logical_tokens_seen = 0

    def _prepare_reference(self, ref_model: Optional[torch.nn.Module]) -> Optional[torch.nn.Module]:
        """A live reference model ready for the run: sharded for evaluation like the policy under FSDP
        (``accelerator.prepare_model(..., evaluation_mode=True)``), else on the training device.

        Raises:
            ConfigError: a live reference model under DeepSpeed ZeRO-3 (its weights are partitioned at
                load and preftune does not build an inference engine for them; precompute the reference
                log-probs or use LoRA, whose reference is the adapter switched off).
        """
        if ref_model is None:
            return None
        if self.is_deepspeed_enabled:
            from transformers.integrations import is_deepspeed_zero3_enabled

            if is_deepspeed_zero3_enabled():
                raise ConfigError("a live reference model under DeepSpeed ZeRO-3 is not supported: keep "
                                  "--precompute_ref_log_probs true, or train LoRA (--use_peft)")
            return ref_model.to(self.args.device)
        if self.is_fsdp_enabled:
            return self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        return ref_model.to(self.args.device)

    @property
    def aux_loss_enabled(self) -> bool:
        """TRL's attribute: whether the mixture-of-experts router load-balancing loss is added to every
        loss (the model returns router logits and its weight, ``--router_aux_loss_coef`` or the config's, is
        above 0; :func:`preftune.engine.kinds.moe.router_aux_enabled`)."""
        from preftune.engine.kinds.moe import router_aux_enabled

        return router_aux_enabled(self.model)

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
    def _score(self, model, batch) -> PolicyLogps | PairRewards:
        """The batch scored by the model's kind (``kind.score``: per-sequence log-probs, or rewards of
        a reward model), run inside the forward of ``model`` wrapped by DDP / FSDP / DeepSpeed or not
        (:func:`preftune.distributed.forward_through`)."""
        chunk, made = self.engine_args.logprob_chunk_size, []

        def score(m):
            out = kind_for(m).score(m, batch, chunk)
            made.append(type(out))
            return _fields(out)  # a wrapper's forward returns dicts of tensors

        fields = forward_through(model, score)
        return made[-1](**fields)

    def _reference_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self.ref_model is not None:
                ref = self._score(self.ref_model, batch)
            elif self.reference_context is not None:
                with self.reference_context():
                    ref = self._score(model, batch)
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
        mean. The kind's extra loss terms (e.g. a mixture-of-experts router loss), computed per batch,
        are added with their weights and weigh ``W * B / N`` of the step.
        """
        scores = self._score(model, batch)
        if "kto_labels" in batch:
            scores.labels = batch["kto_labels"]
        if self.loss_args.needs_reference and scores.ref_chosen_logps is None:
            scores.ref_chosen_logps, scores.ref_rejected_logps = self._reference_logps(model, batch)
        if counts is None:
            out = loss_from_table(scores, self.loss_args)
            loss, share = out.losses.mean(), 1.0
        else:
            out = loss_from_table(scores, self.loss_args, num_pairs_total=counts.pairs,
                                  nll_normaliser=counts.chosen_tokens)
            loss, share = out.losses.sum() * (counts.world_size / counts.pairs), counts.share(out.losses.shape[0])
        metrics = {k: v.detach().float() for k, v in out.metrics.items()}
        for name, term in scores.extra_losses.items():
            loss = loss + (share * scores.extra_loss_weights.get(name, 1.0)) * term.to(loss.dtype)
            metrics[name] = term.detach().float()
        return loss, metrics

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        """The loss of one micro-batch; in training with ``num_items_in_batch`` (the step's
        :class:`GlobalCounts`, from :meth:`get_batch_samples`) its share of the global batch loss."""
        counts = num_items_in_batch if isinstance(num_items_in_batch, GlobalCounts) and model.training else None
        loss, metrics = self.batch_loss_and_metrics(model, inputs, counts)
        if counts is not None and not _HONOURS_SCALED_LOSS:  # an older Trainer divides by the accumulation steps
            loss = loss * self.current_gradient_accumulation_steps
        values = _to_host({"loss": loss, **metrics})  # one device sync for the loss and every metric
        loss_value = values.pop("loss")
        finite = self.guard_batch(loss_value, values, inputs) if model.training else True  # raises under stop
        if model.training:
            self.logical_tokens_seen += int(inputs["num_logical_tokens"])
        if finite:  # a skipped batch's terms stay out of the logged means
            self._store(values, "train" if model.training else "eval")
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics = self.batch_loss_and_metrics(model, inputs)
        self._store(metrics, "eval")
        return loss.detach(), None, None

    # ---- metrics --------------------------------------------------------------------------------
    def _store(self, metrics: dict[str, Any], split: str) -> None:
        for key, value in _to_host(metrics).items():
            self._stored_metrics[split][key].append(value)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Add the stored metrics (means over the window's micro-batches of *all* ranks: one
        ``all_gather_object`` under several processes, on every rank) and ``logical_tokens_seen``
        (summed over the ranks), then the Trainer's log (printed and reported by the main process)."""
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        # an evaluation's prefix from its runtime key: "eval_" or, for one of several eval sets, "eval_<name>_"
        prefix = next((k[:-len("runtime")] for k in logs if k.startswith("eval_") and k.endswith("_runtime")),
                      "eval_") if split == "eval" else ""
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
