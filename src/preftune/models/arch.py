"""Which model kind — and so which transformers class — loads a model, from its config, before any
weights are read (:func:`preftune.engine.kinds.kind_for_config`):

* ``--loss rm``: ``AutoModelForSequenceClassification`` with one label (a decoder-only body only);
* ``config.is_encoder_decoder`` (T5, mT5, BART, Marian ...): ``AutoModelForSeq2SeqLM``. Loading
  such a model with ``AutoModelForCausalLM`` either fails with transformers' list of hundreds of
  configs (T5) or silently builds the *decoder alone* (``BartForCausalLM``: the encoder dropped);
* a vision–language config (``vision_config``, an image-text-to-text model type):
  ``AutoModelForImageTextToText`` with its ``AutoProcessor``;
* an encoder-only model (BERT, RoBERTa, ELECTRA ...: a masked LM whose config is not a decoder)
  is refused; anything else: ``AutoModelForCausalLM``.
"""

from __future__ import annotations

from typing import Any, Optional

from preftune.config import ModelArguments
from preftune.engine.kinds import kind_for_config

from .source import resolve_model_source, source_config


def loading_kind(model_args: ModelArguments, source: Optional[str] = None, *, reward_model: bool = False) -> Any:
    """The model kind that loads the model ``model_args`` names (``source``: already resolved); its
    ``auto_class`` / ``processing_class`` name the transformers classes.

    Raises:
        UnsupportedModelError: the kind refuses the config (see the module docstring).
        ModelLoadError: the default model is not installed, or a GGUF path is wrong.
    """
    source = source or resolve_model_source(model_args)
    name = model_args.model_name_or_path or source
    return kind_for_config(source_config(model_args, source), reward_model=reward_model, name=name)


def auto_class(kind: Any):
    """The transformers class ``kind.auto_class`` names (``AutoModelForCausalLM`` ...)."""
    import transformers

    return getattr(transformers, kind.auto_class)
