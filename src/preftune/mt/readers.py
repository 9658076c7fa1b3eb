"""Readers for machine-translation data.

Formats:

* ALMA parallel JSON: ``[{"translation": {"de": "...", "en": "..."}}, ...]`` (ALMA's
  ``human_written_data/``), read by :func:`read_parallel_json`.
* Line-aligned text: ``train.de-en.de`` + ``train.de-en.en``, read by :func:`read_parallel_text`.
* ALMA-R triplets (``haoranxu/ALMA-R-Preference`` layout, plus preftune's generic ``candidates``
  extension; see ``docs/mt-cpo.md``): :func:`read_triplet_file` loads them and
  :func:`triplets_to_preference_records` turns them into ``prompt``/``chosen``/``rejected``.

Every error names the file, the record index (0-based) or line number (1-based), and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

from preftune.mt.triplets import triplets_to_preference_records

__all__ = [
    "read_lines",
    "read_parallel_json",
    "read_parallel_text",
    "read_triplet_file",
    "read_sources_and_references",
    "triplets_to_preference_records",
]


def read_lines(path: str | Path) -> list[str]:
    """Read a text file as one segment per line, trailing whitespace removed from each line
    (what sacreBLEU's command line does). A final newline does not create an empty segment.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line that is not UTF-8 text (file, line and byte named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as fh:
        return [_utf8(raw, path, number).rstrip() for number, raw in enumerate(fh, start=1)]


def _utf8(data: bytes, path: Path, number: int) -> str:
    """``data`` (line ``number`` of ``path``, 1-based, or the whole file from line 1) decoded as UTF-8;
    a UTF-8 byte-order mark at the start of the file is dropped.

    Raises:
        ValueError: not UTF-8; the message names the file, the line of the first bad byte and the byte.
    """
    try:
        return data.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        line = number + data[:err.start].count(b"\n")
        raise ValueError(f"{path}: line {line}: not UTF-8 text ({err.reason}, byte {data[err.start]:#04x}); "
                         "save the file as UTF-8") from None


def _load_json_records(path: Path) -> list:
    """A JSON list, or JSON Lines (one object per line)."""
    text = _utf8(path.read_bytes(), path, 1)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON: {err}") from None
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {lineno}: invalid JSON: {err}") from None
    return records


def read_parallel_json(path: str | Path, langs: tuple[str, str] | None = None) -> list[dict[str, str]]:
    """Read ALMA parallel JSON (a list, or JSON Lines) and return the ``translation`` dicts.

    Args:
        path: the file.
        langs: if given, ``(src, tgt)``: both keys must be present and strings in every record.

    Returns:
        One dict per record, e.g. ``{"de": "...", "en": "..."}`` (the ``translation`` value).

    Raises:
        ValueError: not a list of objects, a record without ``translation``, or a missing /
            non-string language field; the message names file, record index and field.
    """
    path = Path(path)
    records = _load_json_records(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {{'translation': {{...}}}} records")
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("translation"), dict):
            raise ValueError(f"{path}: record {i}: field 'translation' is missing or not an object")
        tr = rec["translation"]
        for lang in langs or ():
            if not isinstance(tr.get(lang), str):
                raise ValueError(f"{path}: record {i}: field 'translation.{lang}' is missing or not a string")
        out.append(tr)
    return out


def read_parallel_text(src_path: str | Path, tgt_path: str | Path) -> list[tuple[str, str]]:
    """Read two line-aligned files (``train.de-en.de``, ``train.de-en.en``) into (src, tgt) pairs.

    Raises:
        ValueError: the line counts differ (both files and both counts are named).
    """
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise ValueError(
            f"line counts differ: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)} lines")
    return list(zip(src, tgt))


def read_sources_and_references(
    path: str | Path, src: str, tgt: str, ref_path: str | Path | None = None, require_ref: bool = True,
) -> tuple[list[str], list[str] | None]:
    """Sources (and references) of one direction from an ALMA JSON file or a plain text file.

    A ``.json``/``.jsonl`` file gives both sides; a text file gives the sources and ``ref_path``
    (line-aligned) the references.

    Raises:
        ValueError: missing fields, count mismatch, or ``require_ref`` without references.
    """
    path = Path(path)
    if path.suffix in (".json", ".jsonl"):
        trs = read_parallel_json(path, (src,) + ((tgt,) if require_ref and ref_path is None else ()))
        sources = [t[src] for t in trs]
        refs = [t[tgt] for t in trs] if ref_path is None and all(isinstance(t.get(tgt), str) for t in trs) else None
    else:
        sources, refs = read_lines(path), None
    if ref_path is not None:
        refs = read_lines(ref_path)
        if len(refs) != len(sources):
            raise ValueError(
                f"line counts differ: {path} has {len(sources)} sources, {ref_path} has {len(refs)} references")
    if require_ref and refs is None:
        raise ValueError(f"{path}: no '{tgt}' references; give a JSON file with them or --refs FILE")
    return sources, refs


def read_triplet_file(path: str | Path) -> list[dict]:
    """Load ALMA-R triplet records (JSON list or JSON Lines) without interpreting them.

    Raises:
        ValueError: invalid JSON, or not a list of objects.
    """
    path = Path(path)
    records = _load_json_records(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a list of {{'translation': {{...}}}} objects")
    return records
