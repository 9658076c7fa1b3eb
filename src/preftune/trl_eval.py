"""Evaluation and TRL's views of the TRL-shaped trainers (:mod:`preftune.trl`): new eval sets tokenised on
the fly with their reference log-probs, ``compute_metrics`` on the per-pair rewards, and the tokenised rows
read as TRL's (``trainer.train_dataset[0]["prompt_ids"]``).

:class:`TRLEvalMixin` is mixed into :class:`preftune.trl._TRLTrainer` in front of
:class:`preftune.trainer.PreferenceTrainer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ClassVar, Optional

import torch

from preftune.config import ConfigError
from preftune.trainer import PairDataset
from preftune.types import TokenizedPair


class TRLRow(TokenizedPair):
    """A :class:`~preftune.types.TokenizedPair` that also reads as a row of TRL's tokenised dataset:
    ``row[key]``, ``key in row`` and ``row.keys()`` give TRL's columns (lists of token ids) per trainer
    (:data:`_columns`); attribute access stays preftune's (``row.chosen_ids``: the completion only).

    Raises ``KeyError`` for a column the trainer's rows do not have.
    """

    _columns: ClassVar[dict[str, Callable[[TokenizedPair], list[int]]]] = {}

    def __getitem__(self, key: str) -> list[int]:
        view = self._columns.get(key)
        if view is None:
            raise KeyError(f"{key!r}: the tokenised rows have {', '.join(self._columns)}")
        return view(self)

    def __contains__(self, key: object) -> bool:
        return key in self._columns

    def keys(self) -> list[str]:
        """TRL's column names of this trainer's tokenised rows."""
        return list(self._columns)


class DPORow(TRLRow):
    """TRL 1.16 ``DPOTrainer``'s columns: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (completions)."""

    _columns = {"prompt_ids": lambda p: list(p.prompt_ids), "chosen_ids": lambda p: list(p.chosen_ids),
                "rejected_ids": lambda p: list(p.rejected_ids)}


class EncodedRow(TRLRow):
    """TRL's CPO / ORPO trainers' columns: ``prompt_input_ids``, and ``chosen_input_ids`` /
    ``rejected_input_ids`` (prompt + completion)."""

    _columns = {"prompt_input_ids": lambda p: list(p.prompt_ids),
                "chosen_input_ids": lambda p: list(p.prompt_ids) + list(p.chosen_ids),
                "rejected_input_ids": lambda p: list(p.prompt_ids) + list(p.rejected_ids)}


class RewardRow(TRLRow):
    """TRL 1.16 ``RewardTrainer``'s columns: ``chosen_ids`` / ``rejected_ids`` (prompt + completion)."""

    _columns = {"chosen_ids": lambda p: list(p.prompt_ids) + list(p.chosen_ids),
                "rejected_ids": lambda p: list(p.prompt_ids) + list(p.rejected_ids)}


def as_rows(pairs, row_class: Optional[type[TRLRow]]):
    """``pairs`` (a list, a :class:`PairDataset` or a dict of them) with every plain ``TokenizedPair``
    turned into ``row_class`` in place (the same object, the same fields); returned as given."""
    if row_class is None or pairs is None:
        return pairs
    if isinstance(pairs, dict):
        for value in pairs.values():
            as_rows(value, row_class)
        return pairs
    for pair in getattr(pairs, "pairs", pairs):
        if type(pair) is TokenizedPair:
            pair.__class__ = row_class
    return pairs


class TRLEvalMixin:
    """``evaluate`` on new data, ``compute_metrics`` and the starting weights of a passed ``PeftModel``
    (see the module docstring). Expects the attributes :class:`preftune.trl._TRLTrainer` sets."""

    _row_class: ClassVar[Optional[type[TRLRow]]] = None
    _starting_adapter: Optional[dict[str, torch.Tensor]] = None
    _kept_scores: Optional[list] = None

    def keep_starting_adapter(self) -> None:
        """Copy the trainable (adapter) weights as they are now: a passed ``PeftModel`` whose reference
        log-probs were precomputed (its starting state is the reference) can then score new eval data
        after training. Only the adapter's weights are copied."""
        self._starting_adapter = {name: p.detach().clone() for name, p in self.model.named_parameters()
                                  if p.requires_grad}

    @contextlib.contextmanager
    def _starting_weights(self):
        """The model with the starting adapter weights in place; the trained ones restored after."""
        params = dict(self.model.named_parameters())
        trained = {name: params[name].detach().clone() for name in self._starting_adapter}
        with torch.no_grad():
            for name, tensor in self._starting_adapter.items():
                params[name].copy_(tensor)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, tensor in trained.items():
                    params[name].copy_(tensor)

    # ---- evaluation on another dataset --------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """``Trainer.evaluate``; an ``eval_dataset`` given here (a ``datasets.Dataset`` or a list of dicts in
        any supported format) is tokenised like the training data first, with its reference log-probs
        (DPO) from the live reference (adapters-off for a fresh LoRA, the ``ref_model``) or, where they
        were precomputed without one, computed now (:meth:`_new_reference`). Several eval sets (a dict
        or ``DatasetDict``, here or at construction): one evaluation per set, its metrics prefixed
        ``eval_<name>_``, as ``transformers.Trainer`` does.

        Raises :class:`ConfigError` (a ``ValueError``, TRL's type) when that dataset needs reference
        log-probs that no longer exist: full fine-tuning after training started, without ``ref_model``.
        """
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: records if isinstance(records, PairDataset) else
                            PairDataset(self._tokenize(records, f"eval_dataset[{name!r}]"))
                            for name, records in eval_dataset.items()}
        elif eval_dataset is not None and not isinstance(eval_dataset, (PairDataset, str)):  # str: a set's name
            eval_dataset = PairDataset(self._tokenize(eval_dataset, "eval_dataset"))
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _tokenize(self, records, source: str) -> list[TokenizedPair]:
        from preftune.data import build_datasets
        from preftune.data.pipeline import records_to_raw
        from preftune.engine.kinds import kind_for

        config = self.preftune_groups
        kind = kind_for(self.model)
        data = build_datasets(config.data, self.processing_class, seed=self.args.seed,
                              train_raw=records_to_raw(records, source), **kind.tokenize_options(self.model))
        pairs = kind.prepare_data(data).train
        self._new_reference(pairs, source)
        return as_rows(pairs, self._row_class)

    def _new_reference(self, pairs: list[TokenizedPair], source: str) -> None:
        """Reference log-probs of new eval pairs where the training ones were precomputed and no live
        reference exists: the model as passed is the reference, so they are computed by the model
        before training starts, or (a passed ``PeftModel``) with its starting adapter weights swapped in.
        Full fine-tuning after training started has no reference left: :class:`ConfigError` (as TRL's
        ``ValueError``)."""
        from preftune.engine.reference import compute_reference_logps
        from preftune.run_setup import mixed_precision

        config = self.preftune_groups
        if not config.loss.needs_reference or self.ref_model is not None or self.reference_context is not None:
            return  # no reference, or a live one that scores each batch
        if self._starting_adapter is not None:
            starting = self._starting_weights()
        elif self.state.global_step == 0:
            starting = contextlib.nullcontext()
        else:
            raise ConfigError(
                f"{type(self).__name__}.evaluate({source}=...): Cannot compute reference log-probs for a dataset "
                "passed to `evaluate()` after training has started: they were precomputed for full fine-tuning "
                "without a ref_model, so the reference (the model as it was) is gone; pass this dataset as "
                "eval_dataset when building the trainer, pass a ref_model, or set precompute_ref_log_probs=False")
        batch_size = getattr(self.args, "precompute_ref_batch_size", None) or self.args.per_device_eval_batch_size
        with starting, mixed_precision(self.model, self.args):
            chosen, rejected = compute_reference_logps(self.model, pairs, batch_size=batch_size,
                                                       chunk_size=config.engine.logprob_chunk_size)
        for pair, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
            pair.ref_chosen_logps, pair.ref_rejected_logps = c, r

    # ---- compute_metrics ----------------------------------------------------------------------
    def _score(self, model, batch):
        scores = super()._score(model, batch)
        if self._kept_scores is not None:
            self._kept_scores.append(scores)
        return scores

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The Trainer's ``prediction_step``; with ``compute_metrics`` also ``(predictions, labels)``:
        predictions ``(B, 2)`` float32, the loss's per-pair rewards ``[chosen, rejected]`` (DPO: β ×
        the log-ratio to the reference; CPO / SimPO / ORPO: β × the policy's (mean) log-probs; reward
        model: the value head's rewards), labels ``(B,)`` zeros (column 0, chosen, is preferred)."""
        from preftune.losses import compute_loss

        if self.compute_metrics is None or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        self._kept_scores = []
        try:
            loss, _, _ = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
            scores = self._kept_scores[0]  # the policy's (a live reference model is scored after it)
        finally:
            self._kept_scores = None
        with torch.no_grad():
            out = compute_loss(scores, self.loss_args)
        predictions = torch.stack([out.chosen_rewards, out.rejected_rewards], dim=1).float()
        return loss, predictions, torch.zeros(predictions.shape[0], dtype=torch.long, device=predictions.device)

