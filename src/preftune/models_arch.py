"""Which transformers class loads a model, from its config, before any weights are read.

* ``config.is_encoder_decoder`` (T5, mT5, BART, Marian ...): ``AutoModelForSeq2SeqLM``. Loading
  such a model with ``AutoModelForCausalLM`` either fails with transformers' list of hundreds of
  configs (T5) or silently builds the *decoder alone* (``BartForCausalLM``: the encoder dropped).
* an encoder-only model (BERT, RoBERTa, ELECTRA ...: a masked LM whose config is not a decoder)
  is refused: ``AutoModelForCausalLM`` would build ``BertLMHeadModel`` with bidirectional
  attention, whose "next-token" log-probs see the token they score.
* anything else: ``AutoModelForCausalLM`` (the decoder-only default; vision–language models are
  routed earlier, :mod:`preftune.models_vision`).
"""

from __future__ import annotations

import logging

from .config import ModelArguments
from .errors import UnsupportedModelError

logger = logging.getLogger("preftune.models")

SUPPORTED_TEXT = ("decoder-only causal LMs (Llama, Qwen, Mistral, SmolLM, GPT-2, Mixtral/Qwen-MoE ...)",
                  "encoder–decoder LMs (T5, mT5, BART, mBART, Marian, Pegasus, M2M-100)",
                  "vision–language models with their processor")


def _config(source: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception:  # a broken / unreachable source: from_pretrained reports it with its own message
        return None


def source_config(model_args: ModelArguments, source: str | None = None):
    """The ``PretrainedConfig`` of the model ``model_args`` names (``source``: already resolved), or
    None when it cannot be read (the model loading reports why)."""
    if source is None:
        from .models import resolve_model_source

        source = resolve_model_source(model_args)
    return _config(str(source), bool(model_args.trust_remote_code))


def is_encoder_decoder_config(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def check_text_architecture(config, name: str | None) -> None:
    """Refuse an encoder-only model before loading it.

    Raises:
        UnsupportedModelError: a masked LM (BERT-like) whose config is not a decoder, naming the
            model type and what is supported.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False) \
            and not is_encoder_decoder_config(config):
        raise UnsupportedModelError(
            f"--model_name_or_path {name}: model_type {model_type!r} is an encoder-only model (bidirectional "
            "attention): it cannot score a completion token by token. Supported: " + "; ".join(SUPPORTED_TEXT))


def model_loader(config, name: str | None, *, reward_model: bool = False):
    """The ``AutoModelFor...`` class for ``config`` (see the module docstring).

    Raises:
        UnsupportedModelError: an encoder-only model (for a policy), or an encoder–decoder model as
            a reward model (``--loss rm`` supports decoder-only bodies only).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    if is_encoder_decoder_config(config):
        if reward_model:
            raise UnsupportedModelError(
                f"--model_name_or_path {name}: model_type {config.model_type!r} is an encoder–decoder model; "
                "--loss rm (a reward model) supports decoder-only models only")
        return AutoModelForSeq2SeqLM
    if reward_model:
        return AutoModelForSequenceClassification
    if config is not None:
        check_text_architecture(config, name)
    return AutoModelForCausalLM
