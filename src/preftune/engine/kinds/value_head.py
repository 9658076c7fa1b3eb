"""Reward models: a transformer body with a scalar value head, no LM head at all.

A reward model is ``AutoModelForSequenceClassification`` with ``num_labels=1`` (``LlamaForSequenceClassification``,
``Qwen2ForSequenceClassification`` ...): the body (``model.<base_model_prefix>``) gives the final
hidden states, the head ``model.score`` (``Linear(H, 1)``) maps a hidden state to a reward. The
reward of a sequence is the head's value at its last non-pad token (transformers' rule, see
:func:`preftune.engine.layout._last_tokens`), so this kind's *targets* are the ``2B`` last tokens
``batch["last_index"]`` of a laid-out batch (chosen ``0..B-1``, rejected ``B..2B-1``). The body runs
once over the packed rows like the causal kind (shared prompt computed once for chosen and
rejected, padding-free packing); only ``2B`` hidden states reach the head. With LoRA the body holds
the adapters (task ``SEQ_CLS``) and the head is a fully trained copy (peft ``modules_to_save``); the
head is also saved as ``value_head.safetensors`` (ms-swift's file and keys, :meth:`ValueHeadKind.save_extras`).
Training pairs whose chosen and rejected tokens are identical are skipped and counted
(:meth:`ValueHeadKind.prepare_data`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from preftune.engine.attention import attention_inputs
from preftune.engine.forward import prepare_forward
from preftune.engine.kinds.base import ModelKind, config_value
from preftune.errors import ModelLoadError, UnsupportedModelError
from preftune.modeling import is_encoder_decoder, unwrap_peft
from preftune.types import PairRewards

HEAD_NAME = "score"
VALUE_HEAD_FILE = "value_head.safetensors"
# ms-swift 2.x/3.x and LLaMA-Factory name the reward head's weights after TRL's ValueHead
VALUE_HEAD_KEYS = ("v_head.summary.weight", "v_head.summary.bias")

logger = logging.getLogger("preftune.models")
score_logger = logging.getLogger("preftune.score")


def _base(model: nn.Module) -> nn.Module:
    return unwrap_peft(model)


def is_reward_model(model: nn.Module) -> bool:
    """True for a sequence classifier with a ``score`` head (peft-wrapped or not)."""
    base = _base(model)
    return type(base).__name__.endswith("ForSequenceClassification") and isinstance(
        getattr(base, HEAD_NAME, None), nn.Module)


def body_of(model: nn.Module) -> nn.Module:
    """The transformer body of a sequence classifier (``model.<base_model_prefix>``).

    Raises:
        UnsupportedModelError: no body under ``base_model_prefix``, or ``num_labels != 1``.
    """
    base = _base(model)
    config = base.config
    if getattr(config, "num_labels", 1) != 1:
        raise UnsupportedModelError(
            f"{type(base).__name__} has num_labels={config.num_labels}; a reward model has one scalar output "
            "(load it with num_labels=1)")
    body = getattr(base, getattr(base, "base_model_prefix", "model") or "model", None)
    if not isinstance(body, nn.Module) or body is base:
        raise UnsupportedModelError(f"{type(base).__name__} has no transformer body under "
                                    f"base_model_prefix {getattr(base, 'base_model_prefix', None)!r}")
    return body


def value_head_module(model: nn.Module) -> nn.Module:
    """The trained scalar head ``score`` of a reward model (peft's trained copy when wrapped).

    Raises:
        ModelLoadError: the model has no head ``score``.
    """
    score = getattr(_base(model), HEAD_NAME, None)
    if score is None:
        raise ModelLoadError(f"{type(model).__name__} has no value head 'score'; not a reward model")
    copies = getattr(score, "modules_to_save", None)
    if copies is not None:  # peft ModulesToSaveWrapper: the adapter's trained copy
        return copies[score.active_adapters[0]]
    return score


def save_value_head(model: nn.Module, output_dir: str | Path) -> Path:
    """Write the head as ``value_head.safetensors`` in ``output_dir`` (ms-swift's file name and keys).

    Keys ``v_head.summary.weight`` ``(1, H)`` and ``v_head.summary.bias`` ``(1,)`` (zeros for a
    head without bias, so the reward is ``h @ weight.T + bias`` in both layouts); safetensors
    metadata ``{"format": "pt"}``. Returns the file's path.
    """
    from safetensors.torch import save_file

    head = value_head_module(model)
    weight = head.weight.detach().to("cpu").contiguous().clone()
    bias = head.bias if getattr(head, "bias", None) is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    path = Path(output_dir) / VALUE_HEAD_FILE
    save_file({VALUE_HEAD_KEYS[0]: weight, VALUE_HEAD_KEYS[1]: bias.detach().to("cpu").contiguous().clone()},
              str(path), metadata={"format": "pt"})
    return path


def prepare_reward_data(data: Any) -> Any:
    """``--loss rm``: the pairs whose chosen and rejected tokens are identical are skipped (their
    reward difference is 0 whatever the model: no preference to learn), counted in the report with
    the pairs that carry a margin. Returns a new :class:`preftune.data.PreferenceData`.

    Raises:
        preftune.errors.DataError: every training pair is identical.
    """
    from preftune.errors import DataError

    lines = []
    splits = {}
    for label, pairs in (("data", data.train), ("eval data", data.eval)):
        if pairs is None:
            splits[label] = None
            continue
        kept = [p for p in pairs if p.chosen_ids != p.rejected_ids]
        margins = sum(p.margin is not None for p in kept)
        lines.append(f"{label}: rm: {len(pairs) - len(kept)} pairs with identical chosen and rejected tokens "
                     f"skipped, {len(kept)} kept" + (f", {margins} with a margin" if margins else ""))
        splits[label] = kept
    for line in lines:
        score_logger.info(line)
    if not splits["data"]:
        raise DataError(f"--loss rm: every training pair has identical chosen and rejected tokens ({lines[0]})")
    return dataclasses.replace(data, train=splits["data"], eval=splits["eval data"],
                               report="\n".join([data.report, *lines]))


@contextlib.contextmanager
def reward_model_loading(active: bool = True) -> Iterator[None]:
    """Context for loading a causal checkpoint as a sequence classifier (a reward model's base).

    The new head ``score`` is missing from such a checkpoint (initialised from the model's
    ``initializer_range``, under the caller's seed) and its LM head is left unused; transformers
    reports both as a load problem, which they are not here. Inside the context both keys are
    ignored for transformers' generic sequence classifiers, and one log line says what happened.
    """
    if not active:
        yield
        return
    from transformers.modeling_layers import GenericForSequenceClassification as generic

    saved = {name: generic.__dict__.get(name) for name in ("_keys_to_ignore_on_load_missing",
                                                           "_keys_to_ignore_on_load_unexpected")}
    generic._keys_to_ignore_on_load_missing = list(saved["_keys_to_ignore_on_load_missing"] or []) + [r"^score\."]
    generic._keys_to_ignore_on_load_unexpected = list(saved["_keys_to_ignore_on_load_unexpected"] or []) + [
        r"^lm_head\."]
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(generic, name)
            else:
                setattr(generic, name, value)
    logger.info("reward model: scalar head 'score' on the model's body (a head the checkpoint lacks starts "
                "random, seeded; an LM head in it is not used)")


def _check_pad(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_pad = getattr(text_config, "pad_token_id", None)
    batch_pad = batch.get("pad_token_id")
    if model_pad is not None and batch_pad is not None and int(batch_pad) != int(model_pad):
        raise ValueError(
            f"the batch was laid out with pad id {int(batch_pad)} but the reward model's config.pad_token_id is "
            f"{model_pad}: pass pad_token_id={model_pad} to collate_pairs (the tokenizer's pad id), or set "
            "config.pad_token_id to it")


class ValueHeadKind(ModelKind):
    """Sequence classifiers with one label: hidden states at each sequence's last token → ``score``."""

    name = "value_head"
    auto_class = "AutoModelForSequenceClassification"
    scores = "rewards"  # no LM head: score gives PairRewards (engine.rewards), not log-probs
    peft_task_type = "SEQ_CLS"
    modules_to_save = [HEAD_NAME]
    description = "reward models"

    def matches(self, model: nn.Module) -> bool:
        return is_reward_model(model)

    def matches_config(self, config: Any, *, reward_model: bool = False) -> bool:
        return reward_model

    def check_config(self, config: Any, name: Optional[str]) -> None:
        """Raises :class:`UnsupportedModelError` for an encoder–decoder or vision–language body."""
        if is_encoder_decoder(config):
            raise UnsupportedModelError(
                f"--model_name_or_path {name}: model_type {config_value(config, 'model_type')!r} is an encoder–decoder "
                "model; --loss rm (a reward model) supports decoder-only models only")
        if config_value(config, "vision_config") is not None:
            raise UnsupportedModelError(f"--model_name_or_path {name}: --loss rm (a reward model) is not supported "
                                        "for vision–language models yet")

    def load_kwargs(self) -> dict[str, Any]:
        return {"num_labels": 1}

    def loading(self) -> contextlib.AbstractContextManager:
        return reward_model_loading()

    def hidden_at_targets(self, model: nn.Module, batch: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Final hidden states ``(2B, H)`` at ``batch["last_index"]`` (chosen then rejected), no extras.

        Raises:
            ValueError: the batch has no ``last_index`` (not laid out by ``collate_pairs``).
        """
        if "last_index" not in batch:
            raise ValueError("value-head model: the batch has no last_index; lay it out with "
                             "preftune.engine.layout.collate_pairs")
        body = body_of(model)
        kwargs = attention_inputs(model, batch)
        hidden = body(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["last_index"]), {}

    def head(self, model: nn.Module) -> nn.Module:
        """The value head ``score`` (``(..., H) -> (..., 1)``; peft's trained copy when wrapped)."""
        body_of(model)  # checks num_labels
        return getattr(_base(model), HEAD_NAME)

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: Optional[int] = None
              ) -> PairRewards:
        """Rewards of the B pairs of ``batch`` (see :func:`preftune.engine.rewards.sequence_rewards`);
        ``chunk_size`` is not used (no LM head).

        Raises:
            UnsupportedModelError: ``num_labels != 1``.
            ValueError: the batch was laid out with another pad id than ``config.pad_token_id``.
        """
        _check_pad(model, batch)
        prepare_forward(model, batch)  # memory budget, heap trimming, fused LoRA: as for the log-prob kinds
        hidden, extras = self.hidden_at_targets(model, batch)
        values = self.head(model)(hidden).squeeze(-1).float()
        b = int(batch["num_pairs"])
        margin = batch.get("margin")
        return PairRewards(chosen_rewards=values[:b], rejected_rewards=values[b:],
                           margin=None if margin is None else margin.float(), extra_losses=extras,
                           extra_loss_weights=self.extra_loss_weights(model, extras))

    def prepare_data(self, data: Any) -> Any:
        """Identical pairs skipped and counted (:func:`prepare_reward_data`)."""
        return prepare_reward_data(data)

    def ready(self, model: nn.Module, tokenizer: Any) -> None:
        """``config.pad_token_id`` = the tokenizer's (transformers reads the reward at the last non-pad
        token), then the generation config's pad id as for every kind."""
        model.config.pad_token_id = tokenizer.pad_token_id
        super().ready(model, tokenizer)

    def save_extras(self, model: nn.Module, output_dir: str | Path) -> list[Path]:
        """``value_head.safetensors`` (:func:`save_value_head`)."""
        return [save_value_head(model, output_dir)]


KIND = ValueHeadKind()
