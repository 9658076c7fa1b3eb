"""``--columns old=new ...``: rename fields of the raw records before format detection.

The same idea as ms-swift's ``--columns '{"old": "new"}'`` (a JSON object is accepted too) and
LLaMA-Factory's ``columns`` — note LLaMA-Factory writes the mapping the other way round (its key is
the role, its value the file's column: ``"messages": "conversations"`` is
``--columns conversations=messages`` here). Renames are simultaneous (``a=b b=a`` swaps). A field
renamed onto a name the record already uses is an error naming file, record and field; a column
that no record of any given file has is an error too (a typo would otherwise be ignored).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, Optional

from .errors import DataError, where
from .loading import RawData, json_object


def parse_columns(spec: Any) -> dict[str, str]:
    """``["a=b", "c=d"]``, ``"a=b c=d"``, ``'{"a": "b"}'`` or ``{"a": "b"}`` -> ``{"a": "b", "c": "d"}``.

    Raises :class:`ValueError` for an item without ``=``, an empty name, a column given twice,
    two columns renamed to one name, or a JSON value that is not an object of strings.
    """
    if spec is None:
        return {}
    pairs: list[tuple[Any, Any]] = []
    items = spec.split() if isinstance(spec, str) and not spec.lstrip().startswith("{") else spec
    if isinstance(items, str):
        items = [items]
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        for item in items:
            if isinstance(item, str) and item.lstrip().startswith("{"):
                loaded = json_object(item, f"--columns {item!r}", error=ValueError, invalid="not a JSON object ({msg})",
                                     not_object='expected a JSON object {{"old": "new"}}')
                pairs += list(loaded.items())
            elif isinstance(item, str) and "=" in item:
                pairs.append(tuple(item.split("=", 1)))
            else:
                raise ValueError(f"--columns {item!r}: expected old=new (or a JSON object {{\"old\": \"new\"}})")
    mapping: dict[str, str] = {}
    for old, new in pairs:
        if not isinstance(old, str) or not isinstance(new, str) or not old.strip() or not new.strip():
            raise ValueError(f"--columns {old!r}={new!r}: both names must be non-empty strings")
        old, new = old.strip(), new.strip()
        if old in mapping:
            raise ValueError(f"--columns: column {old!r} is renamed twice ({mapping[old]!r} and {new!r})")
        if new in mapping.values():
            raise ValueError(f"--columns: two columns are renamed to {new!r}")
        if old != new:
            mapping[old] = new
    return mapping


def rename_columns(raws: Iterable[RawData], mapping: dict[str, str], *, flag: Optional[str] = "--columns") -> None:
    """Rename the fields of every record of ``raws`` in place (see the module docstring).

    Raises :class:`DataError` for a rename onto a field the record already has, or for a column
    that none of the records has.
    """
    if not mapping:
        return
    raws = list(raws)
    used: Counter = Counter()
    for raw in raws:
        for index, (record, location) in enumerate(zip(raw.records, raw.locations)):
            if not any(old in record for old in mapping):
                continue
            renamed: dict = {}
            for key, value in record.items():
                target = mapping.get(key, key)
                if target in renamed:
                    raise DataError(f"{where(raw.source, location, target)}: {flag} renames a field onto "
                                    f"{target!r}, which the record already has")
                renamed[target] = value
                used[key] += key in mapping
            raw.records[index] = renamed
    unused = [old for old in mapping if not used[old]]
    if unused:
        sources = ", ".join(raw.source for raw in raws)
        raise DataError(f"{flag}: no record of {sources} has the field(s) {', '.join(map(repr, unused))}")
