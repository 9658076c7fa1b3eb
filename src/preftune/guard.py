"""The non-finite guard: a run never trains on, logs away or saves NaN.

Checked on every update, at almost no cost (the values are already synchronised to the host for
the logged metrics, and the Trainer computes the gradient norm anyway):

* the batch loss and every loss term / metric of the batch (``nll_loss``, ``rewards/*``,
  ``logps/*`` ...), after the forward and before the backward;
* the gradient norm of the update (the Trainer's clip / norm hook, ``_get_grad_norm``), before
  the optimiser step;
* the trainable weights, before every checkpoint and before the final save.

``--nan_policy stop`` (default): the first non-finite value raises :class:`NonFiniteError`, whose
one-line message names the step, the batch's records (file and line), the non-finite terms and
the newest complete checkpoint; the CLI prints it and exits with status 3. Nothing is saved as
the final model. ``--nan_policy skip_batch``: that update is not applied (gradients dropped, no
optimiser step: AdamW's moments and step count stay as they were; the learning-rate schedule
still advances), the skip is logged as a warning naming the same things and counted in the
logged ``skipped_batches``; more than ``--max_skipped_batches`` skips stop the run as above.
Logged losses are the real values: transformers' NaN filter (``--logging_nan_inf_filter``) is
off by default in preftune, and under ``skip_batch`` the logged ``loss`` of a window is the mean
over the updates that were applied (``nan`` when none was).

The test-only kill points of ``tests/test_reliability.py`` are in :mod:`preftune.faults`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from preftune.errors import NonFiniteError
from preftune.faults import fault_point

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("preftune.guard")

NAN_POLICIES = ("stop", "skip_batch")


# ---- checks --------------------------------------------------------------------------------------
def _as_float(value: Any) -> float:
    return float(value.detach().float()) if hasattr(value, "detach") else float(value)


def non_finite_terms(values: dict[str, Any]) -> list[str]:
    """``["loss=nan", "nll_loss=inf", ...]`` for the non-finite scalars among ``values`` (floats or
    0-d tensors)."""
    bad = []
    for name, value in values.items():
        v = _as_float(value)
        if not math.isfinite(v):
            bad.append(f"{name}={v}")
    return bad


def non_finite_parameters(model: torch.nn.Module, trainable_only: bool = True) -> list[str]:
    """Names of the (trainable) parameters that hold a NaN or an infinity."""
    import torch

    return [name for name, p in model.named_parameters()
            if (p.requires_grad or not trainable_only) and not bool(torch.isfinite(p).all())]


class NonFiniteGuard:
    """Per-run state of the guard (see the module docstring).

    Args:
        policy: ``"stop"`` or ``"skip_batch"``.
        max_skipped_batches: under ``skip_batch``, the run stops when more updates than this were
            skipped.
        last_checkpoint: a zero-argument callable returning the newest complete checkpoint (or
            None), for the messages.
    """

    def __init__(self, policy: str = "stop", max_skipped_batches: int = 10,
                 last_checkpoint: Optional[Callable[[], Optional[str]]] = None):
        if policy not in NAN_POLICIES:
            raise ValueError(f"nan policy {policy!r}; choose one of {NAN_POLICIES}")
        self.policy = policy
        self.max_skipped_batches = max_skipped_batches
        self.last_checkpoint = last_checkpoint or (lambda: None)
        self.skipped = 0  # updates skipped in this process (a resumed run counts from 0)
        self.skipped_since_log = 0
        self.last_logged_step: Optional[int] = None
        self._bad_terms: list[str] = []  # non-finite terms of the current update
        self._records: list[Callable[[], list[str]]] = []  # record describers of the current update
        self._micro_bad = False
        self._applied_loss = None  # sum of the current update's finite micro-batch losses (tensor)

    # ---- messages --------------------------------------------------------------------------------
    def _records_text(self) -> str:
        names: list[str] = []
        for describe in self._records:
            names.extend(describe())
        if not names:
            return "records unknown"
        groups: dict[str, list[str]] = {}  # "data.jsonl, line 7" → {"data.jsonl": ["line 7", ...]}
        for name in names[:16]:
            source, sep, where = name.rpartition(", ")
            groups.setdefault(source if sep else "", []).append(where if sep else name)
        shown = "; ".join(f"{src}: {', '.join(w)}" if src else ", ".join(w) for src, w in groups.items())
        return f"records: {shown}" + (f" … ({len(names)} in all)" if len(names) > 16 else "")

    def _checkpoint_text(self) -> str:
        last = self.last_checkpoint()
        return f"last finite checkpoint: {last}" if last else "no checkpoint was saved"

    def _fail(self, step: int, what: str) -> NonFiniteError:
        return NonFiniteError(
            f"non-finite values at step {step} ({self._records_text()}): {what}; the run is stopped and no "
            f"final model is saved; {self._checkpoint_text()}. Lower --learning_rate, keep --max_grad_norm > 0, "
            "or use --nan_policy skip_batch to skip such updates")

    # ---- hooks -----------------------------------------------------------------------------------
    def check_batch(self, step: int, loss: torch.Tensor, metrics: dict[str, Any],
                    describe_records: Callable[[], list[str]]) -> bool:
        """After a training micro-batch's forward: False (and remembered for the update) when the
        loss or a metric is non-finite. Raises :class:`NonFiniteError` under ``stop``."""
        self._records.append(describe_records)
        bad = non_finite_terms({"loss": loss, **metrics})
        self._micro_bad = bool(bad)
        if bad:
            self._bad_terms.extend(bad)
            if self.policy == "stop":
                raise self._fail(step, ", ".join(bad))
        return not bad

    def after_micro_batch(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss the Trainer adds to its running sum: the real one, or zero for a micro-batch
        that will be skipped (its NaN would otherwise poison every later logged loss)."""
        if self._micro_bad:
            self._micro_bad = False
            return loss.new_zeros(loss.shape)
        self._applied_loss = loss.detach() if self._applied_loss is None else self._applied_loss + loss.detach()
        return loss

    def skip_update(self, step: int, grad_norm: Any, *, scaler_active: bool = False) -> tuple[bool, Any]:
        """Before the optimiser step: ``(skip, applied_loss)``. ``skip`` is True when this update
        must not be applied (a non-finite micro-batch, or a non-finite gradient norm);
        ``applied_loss`` is what the Trainer already added to its running loss for this update
        (to take back). Raises :class:`NonFiniteError` under ``stop`` or past
        ``max_skipped_batches``. With an fp16 loss scaler a non-finite gradient norm is the
        scaler's business (it skips that step itself) and is not counted."""
        bad = list(self._bad_terms)
        if grad_norm is not None and not scaler_active:
            norm = _as_float(grad_norm)
            if not math.isfinite(norm):
                bad.append(f"grad_norm={norm}")
        applied, records = self._applied_loss, self._records_text
        self._bad_terms, self._applied_loss = [], None
        if not bad:
            self._records = []
            return False, None
        try:
            if self.policy == "stop":
                raise self._fail(step, ", ".join(bad))
            self.skipped += 1
            self.skipped_since_log += 1
            if self.skipped > self.max_skipped_batches:
                raise self._fail(step, ", ".join(bad) + f" (update skipped {self.skipped} times, more than "
                                 f"--max_skipped_batches {self.max_skipped_batches})")
            logger.warning("non-finite values at step %d (%s): %s; update skipped (%d of at most %d)",
                           step, records(), ", ".join(bad), self.skipped, self.max_skipped_batches)
        finally:
            self._records = []
        return True, applied

    def adjust_logs(self, logs: dict[str, float], global_step: int, initial_step: int) -> None:
        """Under ``skip_batch``: the window's ``loss`` (and the final ``train_loss``) as the mean over
        the applied updates, and ``skipped_batches`` (cumulative). ``initial_step``: the global step
        this ``train()`` call started from. A call that trained no step (resumed at ``max_steps``)
        reports no ``train_loss`` (transformers would report 0)."""
        steps_this_call = global_step - initial_step
        if "train_loss" in logs and steps_this_call == 0:
            del logs["train_loss"]
        if self.policy != "skip_batch":
            return
        if "loss" in logs:
            start = self.last_logged_step if self.last_logged_step is not None else initial_step
            n = max(global_step - start, 1)
            k = self.skipped_since_log
            logs["loss"] = logs["loss"] * n / (n - k) if n > k else float("nan")
            self.skipped_since_log, self.last_logged_step = 0, global_step
            logs["skipped_batches"] = self.skipped
        if "train_loss" in logs:
            n, k = max(steps_this_call, 1), self.skipped
            logs["train_loss"] = logs["train_loss"] * n / (n - k) if n > k else float("nan")
            logs["skipped_batches"] = self.skipped

    def check_weights(self, model: torch.nn.Module, what: str) -> None:
        """Raise :class:`NonFiniteError` before ``what`` (a save) when a trainable weight is non-finite."""
        bad = non_finite_parameters(model)
        if bad:
            shown = ", ".join(bad[:4]) + (f" … ({len(bad)} tensors)" if len(bad) > 4 else "")
            raise NonFiniteError(f"non-finite weights before {what}: {shown}; not saved; {self._checkpoint_text()}")


def check_nan_policy(args: Any) -> None:
    """Refuse what the guard cannot honour: ``--nan_policy skip_batch`` under DeepSpeed, whose engine
    applies the optimiser step inside the backward, before the guard sees the gradient norm (so no
    update could be skipped).

    Raises:
        preftune.errors.ConfigError: ``skip_batch`` with ``--deepspeed``.
    """
    from preftune.errors import ConfigError

    if getattr(args, "nan_policy", "stop") == "skip_batch" and getattr(args, "deepspeed", None):
        raise ConfigError("--nan_policy skip_batch does not work with --deepspeed (DeepSpeed applies the update "
                          "inside the backward, before it could be skipped); use --nan_policy stop")


class GuardedTrainerMixin:
    """``transformers.Trainer`` hooks of the guard (mixed into :class:`preftune.trainer.PreferenceTrainer`).

    The subclass calls :meth:`guard_batch` from ``compute_loss`` in training; this mixin overrides
    ``training_step`` (the running loss), ``_get_grad_norm`` (the Trainer's gradient-norm hook,
    called once per update before ``optimizer.step``) and ``log``.
    """

    @property
    def guard(self) -> NonFiniteGuard:
        if getattr(self, "_guard", None) is None:
            check_nan_policy(self.args)
            from preftune.outputs import latest_complete_checkpoint

            out = self.args.output_dir
            self._guard = NonFiniteGuard(getattr(self.args, "nan_policy", "stop"),
                                         getattr(self.args, "max_skipped_batches", 10),
                                         last_checkpoint=lambda: latest_complete_checkpoint(out, warn=False))
        return self._guard

    def describe_records(self, inputs: dict[str, Any]) -> Callable[[], list[str]]:
        """A lazy describer of a batch's records (``"data.jsonl, line 7"``): nothing is synchronised
        to the host unless a message needs it."""
        index = inputs.get("record_index")
        dataset = self.train_dataset

        def describe() -> list[str]:
            if index is None:
                return []
            pairs = getattr(dataset, "pairs", None)
            out = []
            for i in index.tolist():
                location = getattr(pairs[i], "location", None) if pairs is not None and 0 <= i < len(pairs) else None
                out.append(location or f"train pair #{i}")
            return out

        return describe

    def guard_batch(self, loss: torch.Tensor, metrics: dict[str, Any], inputs: dict[str, Any]) -> bool:
        """Check a training batch's loss and terms (see :meth:`NonFiniteGuard.check_batch`)."""
        return self.guard.check_batch(self.state.global_step + 1, loss, metrics, self.describe_records(inputs))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        return self.guard.after_micro_batch(loss)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        fault_point("step")
        scaler = getattr(self.accelerator, "scaler", None)
        skip, applied = self.guard.skip_update(self.state.global_step + 1, grad_norm, scaler_active=scaler is not None)
        if skip:
            if applied is not None:
                self._tr_loss -= applied
            # no gradient: torch optimisers leave the parameter and its state untouched. Under the fp16
            # GradScaler too: the gradients were unscaled (and its inf check made) to compute the norm,
            # so gradients filled with inf now would be applied, not skipped.
            model.zero_grad(set_to_none=True)
        return grad_norm

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        self.guard.adjust_logs(logs, self.state.global_step, getattr(self, "_initial_global_step", 0))
        super().log(logs, start_time)
