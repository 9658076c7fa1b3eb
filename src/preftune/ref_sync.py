"""TR-DPO: the reference policy follows the policy during training (``--sync_ref_model``), and the
loss's per-sequence outputs (LD-DPO, WPO) set up on the trainer's models.

Trust-region DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment",
arXiv 2404.09656, Eq. 3, the "soft update"): every ``ref_model_sync_steps`` optimizer steps

    theta_ref <- alpha * theta + (1 - alpha) * theta_ref,   alpha = ref_model_mixup_alpha,

parameter by parameter, as TRL 1.16's ``SyncRefModelCallback`` (``target.mul_(1 - alpha).add_(policy,
alpha=alpha)`` at the end of each step whose ``global_step`` is a multiple of the sync steps).
Where the reference lives:

* a separate reference model (``ref_model``, the live full fine-tuning reference): its parameters;
* LoRA: a frozen reference adapter (``"reference"``, :mod:`preftune.models.peft`) that follows the
  training adapter, parameter by parameter (``lora_A``, ``lora_B`` ...: TRL's rule applied to a copy of
  the initial ``PeftModel``); a fresh adapter's starting copy computes exactly the adapters-off model
  (its ``B`` is zero), a continued one's is the adapter as loaded. Created when training begins unless
  a continued adapter already has it; :func:`preftune.models.peft.reference_context` then switches to it;
* full fine-tuning with precomputed reference log-probs: a frozen copy of the initial model.

With precomputed reference log-probs (TRL refuses the combination) they are recomputed for every
training and evaluation pair after each update, and the training forward takes them from a table by
record index (:func:`preftune.engine.forward.set_reference_table`), so a batch laid out before the
update does not use stale values.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback

from preftune.engine.forward import configure_for_loss, set_reference_table
from preftune.engine.reference import compute_reference_logps
from preftune.errors import ConfigError
from preftune.modeling import is_peft_model
from preftune.models.peft import REFERENCE_ADAPTER, TRAIN_ADAPTER, reference_context

logger = logging.getLogger("preftune.trainer")


def mix_into(target: list[torch.Tensor], source: list[torch.Tensor], alpha: float) -> None:
    """``t <- (1 - alpha) * t + alpha * s`` in place for every pair of tensors (TR-DPO's soft update,
    TRL 1.16's ``SyncRefModelCallback._sync_target_model``: ``t.mul_(1 - alpha).add_(s, alpha=alpha)``).

    Raises:
        ConfigError: the lists differ in length or two tensors in shape (not the same architecture).
    """
    if len(target) != len(source):
        raise ConfigError(f"--sync_ref_model: the reference has {len(target)} parameters, the policy {len(source)}; "
                          "they must be the same architecture")
    with torch.no_grad():
        for t, s in zip(target, source):
            if t.shape != s.shape:
                raise ConfigError(f"--sync_ref_model: reference parameter of shape {tuple(t.shape)} against the "
                                  f"policy's {tuple(s.shape)}; they must be the same architecture")
            t.mul_(1.0 - alpha).add_(s.to(device=t.device, dtype=t.dtype), alpha=alpha)


def _renamed(name: str, old: str, new: str) -> str:
    return ".".join(new if part == old else part for part in name.split("."))


def adapter_pairs(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(reference, training)`` parameters of a ``PeftModel``'s two adapters, matched by name (the
    ``"default"`` segment of each training-adapter parameter name replaced by ``"reference"``).

    Raises:
        ConfigError: a training-adapter parameter without its reference counterpart.
    """
    params = dict(model.named_parameters())
    targets, sources = [], []
    for name, param in params.items():
        if TRAIN_ADAPTER not in name.split("."):
            continue
        ref_name = _renamed(name, TRAIN_ADAPTER, REFERENCE_ADAPTER)
        if ref_name not in params:
            raise ConfigError(f"--sync_ref_model: the reference adapter has no parameter {ref_name}")
        targets.append(params[ref_name])
        sources.append(param)
    return targets, sources


def add_reference_adapter(model: nn.Module) -> None:
    """Add a frozen ``"reference"`` adapter to a ``PeftModel``, a copy of the training adapter as it is
    now; the training adapter stays active and every ``requires_grad`` as it was (the new ones False)."""
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    active = model.active_adapter
    config = copy.deepcopy(model.peft_config[TRAIN_ADAPTER])
    config.inference_mode = True
    model.add_adapter(REFERENCE_ADAPTER, config)
    model.set_adapter(active)
    for name, param in model.named_parameters():
        param.requires_grad_(grads.get(name, False))
    targets, sources = adapter_pairs(model)
    with torch.no_grad():
        for t, s in zip(targets, sources):
            t.copy_(s)


class ReferenceSync(TrainerCallback):
    """The TR-DPO update of a :class:`preftune.trainer.PreferenceTrainer`'s reference (module docstring)."""

    def __init__(self, trainer: Any, alpha: float, steps: int):
        self.trainer, self.alpha, self.steps = trainer, float(alpha), int(steps)
        self.reference: Optional[nn.Module] = None  # the module scoring the reference (None before set-up)
        self.context = None  # its context (LoRA: the reference adapter switched on)
        self.syncs = 0

    # ---- set-up ---------------------------------------------------------------------------------
    def _pairs(self) -> tuple[list, list]:
        """The training pairs and every evaluation pair of the trainer."""
        train = list(getattr(self.trainer.train_dataset, "pairs", []) or [])
        evaluation = self.trainer.eval_dataset
        sets = evaluation.values() if isinstance(evaluation, dict) else [evaluation] if evaluation is not None else []
        return train, [p for s in sets for p in (getattr(s, "pairs", None) or [])]

    def precomputed(self) -> bool:
        """The training pairs carry reference log-probs (precomputed once): they are recomputed at each sync."""
        train, _ = self._pairs()
        return bool(train) and all(p.ref_chosen_logps is not None for p in train)

    def setup(self) -> None:
        """Find or make the reference that follows the policy (idempotent)."""
        if self.reference is not None:
            return
        policy = self.trainer.model
        if self.trainer.ref_model is not None:
            self.reference = self.trainer.ref_model
        elif is_peft_model(policy):
            if REFERENCE_ADAPTER not in policy.peft_config:
                add_reference_adapter(policy)
            self.reference, self.context = policy, functools.partial(reference_context, policy)
        elif self.precomputed():
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
            configure_for_loss(self.trainer.loss_args, None, self.reference)
        else:
            raise ConfigError("--sync_ref_model needs a reference to update: LoRA (--use_peft), a reference model, "
                              "or precomputed reference log-probs")

    def parameter_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(reference, policy)`` tensors the update mixes."""
        policy = self.trainer.model
        if self.reference is policy:
            return adapter_pairs(policy)
        return [p for p in self.reference.parameters()], [p for p in policy.parameters()]

    # ---- the update -----------------------------------------------------------------------------
    def sync(self) -> None:
        """Mix the policy into the reference; recompute precomputed reference log-probs."""
        self.setup()
        targets, sources = self.parameter_pairs()
        mix_into(targets, sources, self.alpha)
        self.syncs += 1
        if self.precomputed():
            self.recompute()

    def recompute(self) -> None:
        """Reference log-probs of every training and evaluation pair under the updated reference; the
        training ones also as the table the training forward reads (by ``record_index``)."""
        train, evaluation = self._pairs()
        pairs = train + evaluation
        t = self.trainer
        with t.autocast_smart_context_manager():
            chosen, rejected = compute_reference_logps(
                self.reference, pairs, reference_context=self.context,
                batch_size=t.args.per_device_eval_batch_size, chunk_size=t.engine_args.logprob_chunk_size,
                device=t.args.device)
        for pair, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
            pair.ref_chosen_logps, pair.ref_rejected_logps = c, r
        n = len(train)
        table_c, table_r = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for i, pair in enumerate(train):
            index = pair.record_index if pair.record_index is not None else i
            table_c[index], table_r[index] = pair.ref_chosen_logps, pair.ref_rejected_logps
        set_reference_table(t.model, table_c, table_r)
        logger.info("TR-DPO: reference log-probs of %d pairs recomputed after update %d", len(pairs), self.syncs)

    # ---- TrainerCallback ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.setup()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.steps == 0:
            self.sync()


def setup_trainer(trainer: Any) -> Optional[ReferenceSync]:
    """What the loss needs of a :class:`preftune.trainer.PreferenceTrainer`'s models: LD-DPO / WPO outputs
    on the policy and the reference model (:func:`preftune.engine.forward.configure_for_loss`) and, with
    ``--sync_ref_model``, the TR-DPO callback (returned; None without it).

    Raises:
        ConfigError: ``--sync_ref_model`` under FSDP or DeepSpeed ZeRO-3 (sharded parameters), or a bad
            ``--ld_alpha``.
    """
    loss_args = trainer.loss_args
    try:
        configure_for_loss(loss_args, trainer.model, trainer.ref_model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not getattr(loss_args, "sync_ref_model", False):
        return None
    zero3 = False
    if trainer.is_deepspeed_enabled:
        from transformers.integrations import is_deepspeed_zero3_enabled

        zero3 = is_deepspeed_zero3_enabled()
    if trainer.is_fsdp_enabled or zero3:
        raise ConfigError("--sync_ref_model (TR-DPO) with FSDP or DeepSpeed ZeRO-3 is not supported (sharded "
                          "parameters); use DDP / ZeRO-2, or drop --sync_ref_model")
    callback = ReferenceSync(trainer, loss_args.ref_model_mixup_alpha, loss_args.ref_model_sync_steps)
    trainer.add_callback(callback)
    if trainer.ref_model is None and not is_peft_model(trainer.model) and callback.precomputed():
        # full fine-tuning with precomputed log-probs: the reference copy that follows the policy exists from
        # the start and is the trainer's ref_model, as in TRL (it also scores eval data given later)
        callback.setup()
        trainer.ref_model = callback.reference
    return callback
