"""Encoder–decoder LMs (T5, mT5, BART, mBART, Marian, Pegasus, M2M-100): encoder once per pair on
the prompt, decoder over chosen and rejected.

For a batch laid out by the kind's ``collate`` (:func:`preftune.engine.layout_seq2seq.collate_seq2seq`)
the encoder runs over the prompt rows, the decoder over the completion rows (decoder inputs = the
labels shifted right, ``decoder_start_token_id`` first) cross-attending to its pair's encoder states,
and the decoder's final hidden states at the scored positions go to the chunked LM head
(:func:`preftune.engine.lm_head.token_logps`), exactly as for decoder-only models. Loaded with
``AutoModelForSeq2SeqLM``; text is tokenised with the tokenizer's own special tokens
(:meth:`Seq2SeqKind.tokenize_options`); LoRA task ``SEQ_2_SEQ_LM``.

The head reproduces ``model(...).logits`` from the decoder's last hidden state ``h``:

* T5 with ``scale_decoder_outputs`` (original T5, tied embeddings): ``lm_head(h * d_model**-0.5)``
  (mT5 does not rescale);
* BART-family models with ``final_logits_bias``: ``lm_head(h) + final_logits_bias``;
* otherwise ``lm_head(h)``.

Only the model types of :data:`SUPPORTED` are accepted (their forward is exactly encoder →
decoder → the head above; tests check the head against ``model(...).logits``); any other
encoder–decoder model (FSMT, ProphetNet, T5Gemma's soft-capped logits, SwitchTransformers' router
losses, speech or vision encoders) is an :class:`~preftune.errors.UnsupportedModelError` naming the
supported types. :data:`PACKABLE` types (relative attention bias: positions never read from the
row) may hold several sequences per row; the others get padded rows of one sequence.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from preftune.engine.kinds.base import ModelKind, attention_input_projections
from preftune.engine.layout_seq2seq import collate_seq2seq, is_seq2seq_batch, seq2seq_masks
from preftune.errors import UnsupportedModelError
from preftune.modeling import is_encoder_decoder, unwrap_peft
from preftune.types import TokenizedPair

SUPPORTED = ("t5", "mt5", "bart", "mbart", "marian", "pegasus", "m2m_100")
PACKABLE = ("t5", "mt5")
_SCALED = ("t5",)  # types whose forward rescales the decoder output when config.scale_decoder_outputs


def _base(model: nn.Module) -> nn.Module:
    return unwrap_peft(model)


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is an encoder–decoder LM of :data:`SUPPORTED`
    with a token encoder, a decoder and an LM head (message: class, model type, what is supported)."""
    base = _base(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", "?")
    what = f"{type(base).__name__} (model_type {model_type!r})"
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(f"{what}: encoder–decoder models supported by preftune are {', '.join(SUPPORTED)} "
                                    "(text encoder, decoder, plain LM head); this one is not")
    if getattr(base, "main_input_name", "input_ids") != "input_ids" or not all(
            hasattr(base, name) for name in ("get_encoder", "get_decoder", "get_output_embeddings")) \
            or base.get_output_embeddings() is None:
        raise UnsupportedModelError(f"{what} is not a sequence-to-sequence LM with a token encoder, a decoder and an "
                                    "LM head (load it with AutoModelForSeq2SeqLM)")
    if getattr(config, "output_router_logits", False):
        raise UnsupportedModelError(f"{what}: mixture-of-experts encoder–decoder models (router losses) are not "
                                    "supported")


def packable(model: nn.Module) -> bool:
    """Whether several decoder sequences may share a row (relative positions only: :data:`PACKABLE`)."""
    return getattr(getattr(_base(model), "config", None), "model_type", None) in PACKABLE


def decoder_start_token_id(model: nn.Module) -> int:
    """``config.decoder_start_token_id`` (the first decoder input, as ``_shift_right`` uses).

    Raises:
        UnsupportedModelError: the config has none.
    """
    base = _base(model)
    start = getattr(base.config, "decoder_start_token_id", None)
    if start is None:
        gen = getattr(base, "generation_config", None)
        start = getattr(gen, "decoder_start_token_id", None)
    if start is None:
        raise UnsupportedModelError(_no_start(base))
    return int(start)


def _no_start(base: nn.Module) -> str:
    return (f"{type(base).__name__}: config.decoder_start_token_id is not set; the decoder inputs (labels shifted "
            "right) cannot be built")


def encoder_decoder_default_targets(model: nn.Module) -> list[str]:
    """``DEFAULT`` LoRA targets of an encoder–decoder model: peft's per-architecture list (T5 / mT5
    ``q v``, BART ``q_proj v_proj``), else the query and value projections among
    :func:`~preftune.engine.kinds.base.attention_input_projections` (Hu et al. 2021, "LoRA", Sec. 7.1:
    W_q and W_v) — of every attention: encoder, decoder, cross-attention."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    known = PEFT_DEFAULTS.get(getattr(model.config, "model_type", None))
    if known:
        return list(known)
    found = attention_input_projections(model)
    return [n for n in found if n in ("q", "v", "q_proj", "v_proj")] or found


class Seq2SeqLMHead(nn.Module):
    """``lm_head(h * scale) + bias``: the logits an encoder–decoder LM computes from its decoder's last
    hidden state ``h`` ``(..., H)`` → ``(..., V)``. ``lm_head`` is the model's own (maybe LoRA-wrapped)
    module; ``bias`` (BART's ``final_logits_bias``, ``(1, V)``) is read, not copied."""

    def __init__(self, lm_head: nn.Module, scale: float = 1.0, bias: torch.Tensor | None = None):
        super().__init__()
        self.lm_head = lm_head
        self.scale = scale
        self.bias = bias
        weight = getattr(lm_head, "weight", None)
        self.out_features = getattr(lm_head, "out_features", None) or (weight.shape[0] if weight is not None else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            hidden = hidden * self.scale
        logits = self.lm_head(hidden)
        if self.bias is not None:
            logits = logits + self.bias.to(logits.device)
        return logits


def seq2seq_head(model: nn.Module) -> Seq2SeqLMHead:
    """The :class:`Seq2SeqLMHead` of ``model`` (see the module docstring)."""
    base = _base(model)
    config = base.config
    scale = 1.0
    if config.model_type in _SCALED and getattr(config, "scale_decoder_outputs", False):
        scale = config.d_model ** -0.5
    bias = getattr(base, "final_logits_bias", None)
    return Seq2SeqLMHead(base.get_output_embeddings(), scale, bias if isinstance(bias, torch.Tensor) else None)


def _attn_implementation(model: nn.Module) -> str:
    return getattr(getattr(_base(model), "config", None), "_attn_implementation", None) or "sdpa"


class Seq2SeqKind(ModelKind):
    """Encoder–decoder LMs (see the module docstring). :meth:`bound` carries what ``collate`` needs of
    a model: its decoder start token, pad id, whether its rows may be packed, its type (for the log)."""

    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"
    description = "encoder–decoder models"
    generates_after_prompt = False

    def __init__(self, *, decoder_start_token_id: Optional[int] = 0, pad_token_id: int = 0, packable: bool = True,
                 model_type: str = "", missing_start: str = ""):
        self.decoder_start_token_id = decoder_start_token_id
        self.pad_token_id = pad_token_id
        self.packable = packable
        self.model_type = model_type
        self.missing_start = missing_start  # the error to raise at collate time when the model has no start id

    def matches(self, model: nn.Module) -> bool:
        base = _base(model)
        return is_encoder_decoder(model) and hasattr(base, "get_encoder") and \
            hasattr(base, "get_output_embeddings") and base.get_output_embeddings() is not None

    def matches_config(self, config: Any, *, reward_model: bool = False) -> bool:
        return is_encoder_decoder(config)

    def bound(self, model: nn.Module) -> Seq2SeqKind:
        base = _base(model)
        config = base.config
        try:
            start, missing = decoder_start_token_id(model), ""
        except UnsupportedModelError:
            start, missing = None, _no_start(base)
        return Seq2SeqKind(decoder_start_token_id=start, pad_token_id=config.pad_token_id or 0,
                           packable=packable(model), model_type=config.model_type, missing_start=missing)

    def collate(self, pairs: list[TokenizedPair], *, share_prompt: bool = True, padding_free: bool = True,
                max_tokens_per_batch: Optional[int] = None, pad_token_id: Optional[int] = None
                ) -> dict[str, torch.Tensor]:
        """Encoder rows of prompts, decoder rows of completions
        (:func:`preftune.engine.layout_seq2seq.collate_seq2seq`); ``pad_token_id`` None: the model's
        ``config.pad_token_id`` (else 0).

        Raises:
            UnsupportedModelError: the bound model has no ``decoder_start_token_id``.
        """
        if self.missing_start:
            raise UnsupportedModelError(self.missing_start)
        return collate_seq2seq(pairs, share_prompt=share_prompt, padding_free=padding_free,
                               max_tokens_per_batch=max_tokens_per_batch,
                               pad_token_id=self.pad_token_id if pad_token_id is None else pad_token_id,
                               decoder_start_token_id=self.decoder_start_token_id, packable=self.packable,
                               model_type=self.model_type)

    def tokenize_options(self, model: nn.Module) -> dict[str, Any]:
        """Text is tokenised with the tokenizer's own special tokens on prompt and completions
        (T5: ``text </s>``; BART: ``<s> text </s>``), as the model was trained and TRL's CPO / ORPO
        trainers tokenise them; the prompt is the encoder input."""
        return {"keep_special_tokens": True}

    def default_lora_targets(self, model: nn.Module) -> list[str]:
        return encoder_decoder_default_targets(model)

    def hidden_at_targets(self, model: nn.Module, batch: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_supported(model)
        if not is_seq2seq_batch(batch):
            raise ValueError(f"{type(_base(model)).__name__} is an encoder–decoder model: lay its batches out with "
                             "preftune.engine.layout_seq2seq.collate_seq2seq (kind_for(model).collate)")
        base = _base(model)
        impl = _attn_implementation(model)
        if bool(batch["packed"]) and impl not in ("sdpa", "eager"):
            raise ValueError(f"--attn_implementation {impl}: packed encoder–decoder rows need sdpa or eager attention "
                             "(or --share_prompt false --padding_free false)")
        masks = seq2seq_masks(batch, additive_dtype=getattr(base, "dtype", torch.float32) if impl == "eager" else None)
        encoded = base.get_encoder()(input_ids=batch["input_ids"], attention_mask=masks["encoder"]).last_hidden_state
        rows = batch["decoder_encoder_row"]
        if rows.shape[0] != encoded.shape[0] or not torch.equal(rows, torch.arange(rows.shape[0], device=rows.device)):
            encoded = encoded.index_select(0, rows)  # each decoder row cross-attends to its pair's prompt
        hidden = base.get_decoder()(input_ids=batch["decoder_input_ids"], attention_mask=masks["decoder"],
                                    encoder_hidden_states=encoded, encoder_attention_mask=masks["cross"],
                                    use_cache=False).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"])
        return flat, {}

    def head(self, model: nn.Module) -> nn.Module:
        check_supported(model)
        return seq2seq_head(model)


KIND = Seq2SeqKind()
