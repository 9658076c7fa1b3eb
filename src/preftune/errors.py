"""preftune's error types for models and runs (data errors: :class:`preftune.data.DataError`).

The CLI prints these as one line and exits with status 2 (no traceback).
"""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model, tokenizer or cache entry cannot be loaded; the message says why and what to do."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture is not supported by a preftune path; the message names the model
    type and what is supported."""
