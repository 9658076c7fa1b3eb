"""Encoder–decoder LMs (T5, mT5, BART, mBART, Marian, Pegasus, M2M-100): encoder once per pair on
the prompt, decoder over chosen and rejected.

For a batch laid out by :func:`preftune.engine.layout_seq2seq.collate_seq2seq` the encoder runs
over the prompt rows, the decoder over the completion rows (decoder inputs = the labels shifted
right, ``decoder_start_token_id`` first) cross-attending to its pair's encoder states, and the
decoder's final hidden states at the scored positions go to the chunked LM head
(:func:`preftune.engine.logprobs.token_logps`), exactly as for decoder-only models.

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

import torch
from torch import nn

from preftune.engine.kinds import register_kind
from preftune.errors import UnsupportedModelError

SUPPORTED = ("t5", "mt5", "bart", "mbart", "marian", "pegasus", "m2m_100")
PACKABLE = ("t5", "mt5")
_SCALED = ("t5",)  # types whose forward rescales the decoder output when config.scale_decoder_outputs


def _base(model: nn.Module) -> nn.Module:
    from preftune.modeling import unwrap_peft

    return unwrap_peft(model)


def is_encoder_decoder(model: nn.Module) -> bool:
    """True for a (peft-wrapped) transformers encoder–decoder model (``config.is_encoder_decoder``)."""
    return bool(getattr(getattr(_base(model), "config", None), "is_encoder_decoder", False))


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
        raise UnsupportedModelError(f"{type(base).__name__}: config.decoder_start_token_id is not set; the decoder "
                                    "inputs (labels shifted right) cannot be built")
    return int(start)


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


class Seq2SeqKind:
    """Encoder–decoder LMs (see the module docstring)."""

    name = "seq2seq"

    def matches(self, model: nn.Module) -> bool:
        base = _base(model)
        return is_encoder_decoder(model) and hasattr(base, "get_encoder") and \
            hasattr(base, "get_output_embeddings") and base.get_output_embeddings() is not None

    def hidden_at_targets(self, model: nn.Module, batch: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from preftune.engine.layout_seq2seq import is_seq2seq_batch, seq2seq_masks

        check_supported(model)
        if not is_seq2seq_batch(batch):
            raise ValueError(f"{type(_base(model)).__name__} is an encoder–decoder model: lay its batches out with "
                             "preftune.engine.layout_seq2seq.collate_seq2seq (collate_for(model))")
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


SEQ2SEQ = register_kind(Seq2SeqKind(), first=True)
