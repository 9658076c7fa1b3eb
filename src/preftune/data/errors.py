"""The single error type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data.

    The message always names the file (or Hub id), the record (``line N`` for JSON-lines files,
    ``record N`` otherwise, both 1-based) and, where one is at fault, the field. The CLI prints
    it without a traceback and exits non-zero.
    """


def where(source: str, location: str, field: str | None = None) -> str:
    """Prefix for an error message: ``"<source>, <location>, field '<field>'"``."""
    text = f"{source}, {location}"
    return f"{text}, field {field!r}" if field else text
