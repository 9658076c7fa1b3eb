"""The processing class of a model: its tokenizer (or a vision–language model's processor) with a pad token.

:func:`ensure_pad_token` is the one pad-token rule of preftune (the pad token falls back to the EOS
token, logged; neither is an error): :func:`load_tokenizer` applies it to what it loads, the
TRL-shaped API (:mod:`preftune.trl_support`) to a tokenizer it is given.
"""

from __future__ import annotations

import logging
from typing import Any

from preftune.config import ModelArguments
from preftune.data.vision import is_processor
from preftune.errors import ConfigError, ModelLoadError

from .source import from_pretrained, resolve_model_source

logger = logging.getLogger("preftune.models")


def ensure_pad_token(tokenizer: Any, name: str, *, error: type[Exception] = ModelLoadError,
                     log_name: str | None = None) -> Any:
    """Give ``tokenizer`` a pad token when it has none: its EOS token (logged). Returns ``tokenizer``.

    ``name`` words the error (``"<name> has neither a pad nor an eos token; add a pad token"``),
    ``log_name`` the log line (default ``name``); ``error``: the exception class raised.

    Raises:
        error: the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise error(f"{name} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("%s has no pad token; using the eos token %r", log_name or name, tokenizer.eos_token)
    return tokenizer


def load_processor(model_args: ModelArguments):
    """The model's ``AutoProcessor``; its tokenizer's pad token falls back to EOS (logged).

    Raises:
        ModelLoadError: no processor with an image processor can be loaded, or the tokenizer has
            neither pad nor EOS token.
    """
    from transformers import AutoProcessor

    source = model_args.tokenizer_name_or_path if getattr(model_args, "tokenizer_name_or_path", None) \
        else resolve_model_source(model_args)
    processor = from_pretrained(AutoProcessor, "processor", model_args, source,
                                trust_remote_code=model_args.trust_remote_code)
    if not is_processor(processor):
        raise ModelLoadError(f"--model_name_or_path {model_args.model_name_or_path}: a vision–language model, but "
                             f"{source} holds no image processor (AutoProcessor gave {type(processor).__name__})")
    ensure_pad_token(processor.tokenizer, f"tokenizer of {source}", log_name=f"Tokenizer of {source}")
    return processor


def load_tokenizer(model_args: ModelArguments):
    """Tokenizer of the model (or of ``--tokenizer_name_or_path`` when given), its pad token set by
    :func:`ensure_pad_token`; a vision–language model's processor instead
    (:func:`load_processor`; its ``.tokenizer`` is the text tokenizer).

    Raises:
        ModelLoadError: the tokenizer cannot be loaded, or has neither a pad nor an eos token.
    """
    from transformers import AutoTokenizer

    from .arch import loading_kind

    if loading_kind(model_args).processing_class == "AutoProcessor":
        return load_processor(model_args)
    source = model_args.tokenizer_name_or_path or resolve_model_source(model_args)
    tokenizer = from_pretrained(AutoTokenizer, "tokenizer", model_args, source,
                                trust_remote_code=model_args.trust_remote_code)
    return ensure_pad_token(tokenizer, f"tokenizer of {source}", log_name=f"Tokenizer of {source}")


def ready_tokenizer(tokenizer: Any, model_args: ModelArguments, where: str) -> Any:
    """The tokenizer a script passed (its pad token set by :func:`ensure_pad_token`), or the model's,
    loaded from ``model_args`` (:func:`load_tokenizer`) when it passed none: the TRL-shaped API's door.

    ``where``: the caller (e.g. ``"DPOTrainer"``) the messages name.

    Raises:
        ConfigError: no tokenizer and no model path to load one from, or a tokenizer with neither a
            pad nor an eos token.
        ModelLoadError: the model's tokenizer cannot be loaded.
    """
    if tokenizer is None:
        if not model_args.model_name_or_path:
            raise ConfigError(f"{where}: no processing_class and the model has no name_or_path to load one from")
        return load_tokenizer(model_args)
    return ensure_pad_token(tokenizer, f"{where}: the tokenizer", error=ConfigError, log_name="tokenizer")
