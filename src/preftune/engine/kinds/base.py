"""What every model kind answers, with the answers of a decoder-only LM with an LM head as defaults.

:class:`ModelKind` is the seam between a model and the rest of preftune (see
:mod:`preftune.engine.kinds`): loading (``auto_class`` ...), layout (``collate``), scoring
(``score``: per-sequence log-probs through the chunked LM head), extra loss terms, tokenisation
options, data preparation, the tokenizer facts a model needs (``ready``), PEFT (task type, what
trains in full, LoRA targets) and what is saved besides the weights. A kind overrides what differs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from preftune.engine.forward import prepare_forward, sequence_outputs
from preftune.engine.layout import collate_pairs
from preftune.engine.lm_head import head_token_logps, per_sequence_logps
from preftune.errors import ModelLoadError
from preftune.types import PolicyLogps, TokenizedPair

# Output projections of attention blocks (not part of ms-swift's DEFAULT targets, which are the
# query/key/value projections: swift 2.x lists q_proj, k_proj, v_proj for Llama, c_attn for Qwen).
_ATTENTION_OUTPUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "proj", "out")


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """``config.<name>`` of a transformers config (or a config dict), ``default`` when missing or None."""
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    return default if value is None else value


def attention_input_projections(model: nn.Module) -> list[str]:
    """Leaf names of the query/key/value projections of ``model``'s attention blocks: the linear
    (or transformers ``Conv1D``) children of modules whose class name contains ``Attention``,
    except the output projection. Llama: ``["k_proj", "q_proj", "v_proj"]``; GPT-2: ``["c_attn"]``.

    Raises:
        ModelLoadError: no such layer was found.
    """
    from transformers.pytorch_utils import Conv1D

    names: set[str] = set()
    for module in model.modules():
        if "attention" not in type(module).__name__.lower():
            continue
        for child_name, child in module.named_children():
            if isinstance(child, (nn.Linear, Conv1D)) and child_name not in _ATTENTION_OUTPUT_NAMES:
                names.add(child_name)
    if not names:
        raise ModelLoadError(f"--lora_target_modules DEFAULT: found no attention projection layers in "
                             f"{type(model).__name__}; name the modules (e.g. q_proj v_proj) or use all-linear")
    return sorted(names)


class ModelKind:
    """A model kind; the defaults are those of a decoder-only LM (see the module docstring)."""

    #: short name for logs and errors
    name = "base"
    #: the transformers auto class that loads such a model (``transformers.<auto_class>``)
    auto_class = "AutoModelForCausalLM"
    #: the processing class preftune loads for it: ``AutoTokenizer`` or ``AutoProcessor``
    processing_class = "AutoTokenizer"
    #: what ``score`` returns: ``"logps"`` (:class:`PolicyLogps`) or ``"rewards"`` (:class:`PairRewards`)
    scores = "logps"
    #: peft ``LoraConfig.task_type``
    peft_task_type = "CAUSAL_LM"
    #: modules trained in full next to the LoRA adapters (peft ``modules_to_save``), or None
    modules_to_save: Optional[list[str]] = None
    #: bitsandbytes 8-bit base weights (``--load_in_8bit``) supported
    supports_8bit = True
    #: what the messages call these models
    description = "decoder-only causal LMs"
    #: generation (``preftune generate``, ``mt translate``): ``model.generate`` returns the prompt
    #: followed by the new tokens (decoder-only: prompts padded on the left, the new tokens start after
    #: the prompt); False for an encoder–decoder model (prompts padded on the right, the output is the
    #: decoder's: its start token, then the new tokens)
    generates_after_prompt = True

    # ---- which models, and how they load --------------------------------------------------------
    def matches(self, model: nn.Module) -> bool:
        """True when ``model`` (loaded, peft-wrapped or not) is of this kind."""
        raise NotImplementedError

    def matches_config(self, config: Any, *, reward_model: bool = False) -> bool:
        """True when a model with ``config`` loads as this kind (see :func:`preftune.engine.kinds.kind_for_config`)."""
        raise NotImplementedError

    def check_config(self, config: Any, name: Optional[str]) -> None:
        """Raise :class:`preftune.errors.UnsupportedModelError` for a config this kind cannot train
        (read before any weights); ``name``: the ``--model_name_or_path`` to name."""

    def load_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` keyword arguments (value head: ``num_labels=1``)."""
        return {}

    def loading(self) -> contextlib.AbstractContextManager:
        """Context the weights are read in (value head: its missing head is expected, not reported)."""
        return contextlib.nullcontext()

    def bound(self, model: nn.Module) -> ModelKind:
        """This kind with what ``collate`` needs of ``model`` (default: nothing, ``self``)."""
        return self

    # ---- the forward ---------------------------------------------------------------------------
    def hidden_at_targets(self, model: nn.Module, batch: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(hidden (M, H), extra loss terms)``: the hidden states that score the batch's ``M``
        targets and the unweighted extra loss terms the model computed on the way."""
        raise NotImplementedError

    def head(self, model: nn.Module) -> nn.Module:
        """The module mapping ``(..., H)`` to scores (LM head: ``(..., V)`` logits)."""
        raise NotImplementedError

    def collate(self, pairs: list[TokenizedPair], *, share_prompt: bool = True, padding_free: bool = True,
                max_tokens_per_batch: Optional[int] = None, pad_token_id: Optional[int] = None
                ) -> dict[str, torch.Tensor]:
        """Lay out a batch of pairs as rows (:func:`preftune.engine.layout.collate_pairs`; pad id 0 when None)."""
        return collate_pairs(pairs, share_prompt=share_prompt, padding_free=padding_free,
                             max_tokens_per_batch=max_tokens_per_batch,
                             pad_token_id=0 if pad_token_id is None else pad_token_id)

    def extra_loss_weights(self, model: nn.Module, extras: dict[str, torch.Tensor]) -> dict[str, float]:
        """The weight of each extra loss term in ``extras`` (default: none, ``{}``)."""
        return {}

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: Optional[int] = None) -> PolicyLogps:
        """Per-sequence log-probs of a laid-out batch (on the model's device): the kind's hidden states
        at the targets through the chunked LM head (:func:`preftune.engine.lm_head.token_logps`),
        summed per sequence; ``(B,)`` float32 sums (nats), token counts, the batch's reference
        log-probs when present, the extra loss terms and their weights."""
        options, wanted = prepare_forward(model, batch), sequence_outputs(model)  # wanted: LD-DPO / WPO sums
        flat, extras = self.hidden_at_targets(model, batch)
        logps, log_sum_sq = head_token_logps(self.head(model), flat, batch["target_ids"], chunk_size,
                                             fused=options.fused_lm_head, log_sum_sq=wanted.aligned_logps)
        return per_sequence_logps(logps, batch, extras, self.extra_loss_weights(model, extras),
                                  ld_alpha=wanted.ld_alpha, log_sum_sq=log_sum_sq)

    # ---- data, set-up, saving ------------------------------------------------------------------
    def tokenize_options(self, model: nn.Module) -> dict[str, Any]:
        """Keyword arguments of :func:`preftune.data.build_datasets` / ``tokenize_records`` for this
        kind (default ``{}``: decoder-only tokenisation)."""
        return {}

    def prepare_data(self, data: Any) -> Any:
        """The training data (:class:`preftune.data.PreferenceData`) as this kind trains on it (default: as given)."""
        return data

    def ready(self, model: nn.Module, tokenizer: Any) -> None:
        """Set what a loaded model needs from its tokenizer (a processor's text tokenizer is read):
        ``generation_config.pad_token_id`` when it is None."""
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = getattr(tokenizer, "tokenizer", tokenizer).pad_token_id

    def freezable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` that ``--freeze_vision_tower`` freezes for training (default: none)."""
        return []

    def default_lora_targets(self, model: nn.Module) -> list[str]:
        """``--lora_target_modules DEFAULT``: the attention's query/key/value projections."""
        return attention_input_projections(model)

    def lora_targets(self, model: nn.Module, resolved: str | list[str]) -> str | list[str]:
        """peft's ``target_modules`` for the resolved ``--lora_target_modules`` (default: as resolved)."""
        return resolved

    def save_extras(self, model: nn.Module, output_dir: str | Path) -> list[Path]:
        """Write what this kind saves next to the weights / adapter into ``output_dir``; returns the
        files written (default: none)."""
        return []
