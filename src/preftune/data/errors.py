"""Where a data error happened: the ``file, record, field`` prefix of :class:`preftune.errors.DataError`."""

from __future__ import annotations

from preftune.errors import DataError

__all__ = ["DataError", "where"]


def where(source: str, location: str, field: str | None = None) -> str:
    """Prefix for an error message: ``"<source>, <location>, field '<field>'"``."""
    text = f"{source}, {location}"
    return f"{text}, field {field!r}" if field else text
