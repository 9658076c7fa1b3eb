"""preftune's error types, all in one place.

The CLI (:mod:`preftune.cli`) prints every one of them as one line, without a traceback, and exits
with :data:`EXIT_USER_ERROR` (bad configuration, data or model), :data:`EXIT_NON_FINITE` (a run
that produced non-finite numbers) or :data:`EXIT_DISK_FULL` (no room for a checkpoint or the
output). Nothing here imports from preftune: every layer may raise them.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # ConfigError, DataError, ModelLoadError (and UnsupportedModelError)
EXIT_NON_FINITE = 3  # NonFiniteError
EXIT_DISK_FULL = 4  # DiskFullError: not enough free space for a checkpoint or the final output


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the valid values."""


class DataError(ValueError):
    """Bad input data.

    The message always names the file (or Hub id), the record (``line N`` for JSON-lines files,
    ``record N`` otherwise, both 1-based) and, where one is at fault, the field
    (:func:`preftune.data.errors.where` builds that prefix).
    """


class ModelLoadError(RuntimeError, ValueError):
    """A model, tokenizer or cache entry cannot be loaded; the message says why and what to do.

    Also a :class:`ValueError`: where TRL (through transformers) raises ``ValueError`` for the same cause
    (custom code without ``trust_remote_code``, an unknown model type, an attention kernel the model does
    not support), a TRL script's ``except ValueError`` must still catch preftune's error."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture is not supported by a preftune path; the message names the model
    type and what is supported."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, loss term, gradient norm or weight.

    The message is one line: the step, the batch's records, the non-finite terms and the last
    finite (complete) checkpoint. The CLI prints it and exits with :data:`EXIT_NON_FINITE`.
    """


class DiskFullError(OSError):
    """Not enough free space to write a checkpoint, the final output or the output directory's lock.

    The message is one line: the directory, the bytes needed (estimated before the first save, or
    what was being written) and the bytes free. The CLI prints it and exits with
    :data:`EXIT_DISK_FULL`; the writer has removed its partial directory and the run's lock is
    released as the process ends."""


USER_ERRORS = (ConfigError, DataError, ModelLoadError)
