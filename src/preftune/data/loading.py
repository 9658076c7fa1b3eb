"""Reading raw records from a file, a Hub dataset or the shipped demo set.

``--dataset`` takes ``PATH`` or ``PATH#N``: the first N records (``--dataset_sample first``, the
default), or N records drawn at random without replacement with the run's seed
(``--dataset_sample random``, ms-swift's meaning of ``#N``; as in ms-swift, N larger than the file
repeats the whole file ``N // len`` times and draws the remainder at random). JSON-lines
files (``.jsonl``, ``.jsonl.gz``) are read here line by line so that a bad record can be named by
its line number; ``.json`` is read with the standard library (line and column of a syntax error);
``.parquet`` and ``.csv`` go through :mod:`datasets`; anything that is not a local path and looks
like ``owner/name`` is loaded from the Hub with :func:`datasets.load_dataset` (``owner/name:split``
picks a split, default ``train``).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from dataclasses import dataclass
from importlib import resources
from typing import Optional

from .errors import DataError

DEMO_NAME = "demo.jsonl"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
JSON_SUFFIXES = (".json", ".json.gz")
DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}
SAMPLE_MODES = ("first", "random")
SUPPORTED = ", ".join(JSONL_SUFFIXES + JSON_SUFFIXES + tuple(DATASETS_SUFFIXES))
_COUNT = re.compile(r"[0-9]+")  # ASCII digits only
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


@dataclass
class RawData:
    """Records as read, before format detection.

    ``locations[i]`` names record ``i`` in error messages (``"line 7"`` for JSON lines,
    ``"record 3"`` otherwise, 1-based). ``limit`` is the N of ``PATH#N`` (None without it).
    ``base_dir``: the folder of a local file (relative image paths resolve against it; None for
    Hub data). ``selection``: which records ``PATH#N`` took, in words (None without ``#N``).
    """

    source: str
    records: list[dict]
    locations: list[str]
    limit: Optional[int] = None
    base_dir: Optional[str] = None
    selection: Optional[str] = None

    def __post_init__(self) -> None:
        if self.selection is None and self.limit is not None:
            self.selection = f"first {self.limit} asked" + ("" if len(self.records) == self.limit else ", file is shorter")

    def describe(self) -> str:
        """``"<source>: 200 records (first 200 asked)"`` style summary."""
        text = f"{self.source}: {len(self.records)} records"
        return text + (f" ({self.selection})" if self.selection else "")


def parse_spec(spec: str, flag: str = "--dataset") -> tuple[str, Optional[int]]:
    """Split ``"path#N"`` into ``("path", N)``; ``"path"`` gives ``("path", None)``.

    Raises :class:`DataError` (naming ``flag``) if ``spec`` or its path is empty or N is not a positive
    integer written in ASCII digits (``str.isdigit`` also takes ``²``, which ``int`` refuses).
    """
    if not spec.strip():
        raise DataError(f"{flag} {spec!r}: empty; give a file ({SUPPORTED}) or a Hub id")
    if "#" not in spec:
        return spec, None
    path, _, count = spec.rpartition("#")
    if not _COUNT.fullmatch(count) or int(count) <= 0:
        raise DataError(f"{flag} {spec!r}: the part after '#' must be a positive number of records, got {count!r}")
    if not path.strip():
        raise DataError(f"{flag} {spec!r}: empty path before '#'; give a file ({SUPPORTED}) or a Hub id")
    return path, int(count)


def check_specs(dataset: Optional[list], eval_file: Optional[list]) -> None:
    """What can be checked of ``--dataset`` / ``--eval_file`` before anything loads (called from
    :class:`preftune.config.DataArguments`): not empty, a valid ``#N``, not a directory; the message
    names the flag.

    Raises:
        DataError: naming the flag and the value.
    """
    for flag, specs in (("--dataset", dataset), ("--eval_file", eval_file)):
        for spec in specs or ():
            path, _ = parse_spec(str(spec), flag)
            if os.path.isdir(path):
                raise DataError(f"{flag} {path!r} is a directory; give a file ({SUPPORTED}) or a Hub id")


def demo_path() -> str:
    """Filesystem path of the shipped demo set (``preftune/resources/demo.jsonl``)."""
    ref = resources.files("preftune") / "resources" / DEMO_NAME
    with resources.as_file(ref) as path:  # a real file for regular and editable installs
        return str(path)


def load_raw(spec: Optional[str], *, sample: str = "first", seed: int = 0) -> RawData:
    """Read the records named by ``spec`` (``None``: the demo set).

    ``sample``: what ``#N`` takes, ``"first"`` N records or ``"random"`` N drawn with ``seed`` (see
    the module docstring; the drawn records keep their file order).
    Raises :class:`DataError` for a missing file, an unsupported extension, an unparsable line or
    record (naming file and line), a record that is not a JSON object, or a Hub load failure.
    """
    if sample not in SAMPLE_MODES:
        raise DataError(f"--dataset_sample {sample!r} is not valid; choose one of: {', '.join(SAMPLE_MODES)}")
    if spec is None:
        return _read_jsonl(demo_path(), None)
    path, limit = parse_spec(spec)
    if "::" in path and os.path.isfile(path.split("::", 1)[0]):  # LLaMA-Factory's data (preftune.aliases.dataset_info)
        from preftune.aliases.dataset_info import load_entry

        source, records, locations, base_dir = load_entry(path, limit, lambda p: _load_path(p, None), seed)
        return _finish(RawData(source, records, locations, limit, base_dir))
    if sample == "random" and limit is not None:
        return draw(_load_path(path, None), limit, seed)
    return _load_path(path, limit)


def draw(raw: RawData, n: int, seed: int) -> RawData:
    """``n`` records of ``raw`` drawn at random without replacement (a private generator seeded
    with ``seed``), kept in file order; ``n`` > len repeats every record ``n // len`` times first."""
    total = len(raw.records)
    rounds, rest = divmod(n, total)
    index = sorted(list(range(total)) * rounds + random.Random(seed).sample(range(total), rest))
    selection = f"random {n} of {total}, seed {seed}" + (f", every record {rounds}x + {rest} drawn" if rounds else "")
    return RawData(raw.source, [raw.records[i] for i in index], [raw.locations[i] for i in index], n,
                   raw.base_dir, selection)


def _load_path(path: str, limit: Optional[int]) -> RawData:
    lower = path.lower()
    if os.path.isdir(path):
        raise DataError(f"--dataset {path!r} is a directory; give a file ({SUPPORTED}) or a Hub id")
    if os.path.exists(path):
        if lower.endswith(JSONL_SUFFIXES):
            return _read_jsonl(path, limit)
        if lower.endswith(JSON_SUFFIXES):
            return _read_json(path, limit)
        for suffix, builder in DATASETS_SUFFIXES.items():
            if lower.endswith(suffix):
                return _read_with_datasets(path, builder, limit)
        raise DataError(f"{path}: unsupported file type; supported: {SUPPORTED}")
    looks_like_file = lower.endswith(JSONL_SUFFIXES + JSON_SUFFIXES + tuple(DATASETS_SUFFIXES)) or path.startswith(
        (".", "/", "~"))
    if looks_like_file or not _HUB_ID.match(path):
        raise DataError(f"{path}: file not found (and not a Hub dataset id)")
    return _read_hub(path, limit)


def _open_binary(path: str):
    # bytes, decoded line by line, so that a non-UTF-8 byte is reported on its own line
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _decode(data: bytes, path: str, number: int) -> str:
    """UTF-8 text of ``data`` (line ``number`` of ``path``, 1-based); a UTF-8 byte-order mark at
    the start of the file (line 1) is accepted and dropped (Windows editors write one)."""
    try:
        return data.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        line = number + data[:err.start].count(b"\n")
        raise DataError(f"{path}, line {line}: not UTF-8 text ({err.reason}, byte {data[err.start]:#04x}); "
                        "save the file as UTF-8") from None


def json_object(text: str, where: str, *, error: type[Exception] = DataError,
                invalid: str = "not valid JSON ({msg} at column {col})",
                not_object: str = "expected a JSON object, got {kind}") -> dict:
    """``json.loads(text)``, which must be a JSON object.

    Raises:
        ``error`` (default :class:`DataError`): ``"{where}: "`` + ``invalid`` (formatted with the
            parser's ``msg`` and ``col``) when ``text`` is not JSON, + ``not_object`` (formatted with
            the value's type name ``kind``) when it is JSON but not an object.
    """
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise error(f"{where}: " + invalid.format(msg=err.msg, col=err.colno)) from None
    except _DuplicateKey as dup:
        raise error(f"{where}: {dup}") from None
    if not isinstance(value, dict):
        raise error(f"{where}: " + not_object.format(kind=type(value).__name__))
    return value


class _DuplicateKey(ValueError):
    """A JSON object with the same key twice (``json`` would keep the last value silently)."""


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` of every JSON read here: a key given twice in one object is refused."""
    record: dict = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(f"key {key!r} appears twice in one JSON object (JSON keeps only the last value, "
                                "silently); keep one")
        record[key] = value
    return record


def _read_jsonl(path: str, limit: Optional[int]) -> RawData:
    records: list[dict] = []
    locations: list[str] = []
    try:
        with _open_binary(path) as handle:
            for number, raw_line in enumerate(handle, start=1):
                if limit is not None and len(records) >= limit:
                    break
                line = _decode(raw_line, path, number)
                if not line.strip():
                    continue  # blank lines (e.g. a trailing newline) are not records
                records.append(json_object(line, f"{path}, line {number}"))
                locations.append(f"line {number}")
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({err})") from None
    return _finish(RawData(path, records, locations, limit))


def _read_json(path: str, limit: Optional[int]) -> RawData:
    try:
        with _open_binary(path) as handle:
            text = _decode(handle.read(), path, 1)
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as dup:
        record = _record_of_duplicate(text)
        if record is None:  # several top-level values: JSON lines in a .json file (the line is named there)
            return _read_jsonl(path, limit)
        raise DataError(f"{path}, {record}: {dup}") from None
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            return _read_jsonl(path, limit)
        raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    if limit is not None:
        data = data[:limit]
    for index, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path}, record {index}: expected a JSON object, got {type(record).__name__}")
    return _finish(RawData(path, data, [f"record {i}" for i in range(1, len(data) + 1)], limit))


def _record_of_duplicate(text: str) -> Optional[str]:
    """``"record N"`` of the first object of a JSON list that holds a duplicate key at any depth
    (the error path only: parsed again, marking objects instead of raising); None when ``text`` is
    several JSON values (JSON lines)."""
    class Marked(dict):
        duplicate = False

    def mark(pairs: list) -> dict:
        record = Marked()
        for key, value in pairs:
            record.duplicate = record.duplicate or key in record or _marked(value)
            record[key] = value
        return record

    def _marked(value) -> bool:
        if isinstance(value, list):
            return any(_marked(item) for item in value)
        return bool(getattr(value, "duplicate", False))

    try:
        items = json.loads(text, object_pairs_hook=mark)
    except json.JSONDecodeError:
        return None
    items = items if isinstance(items, list) else [items]
    return next((f"record {i}" for i, item in enumerate(items, start=1) if _marked(item)), "record 1")


def _read_with_datasets(path: str, builder: str, limit: Optional[int]) -> RawData:
    import datasets

    try:
        if builder == "parquet":
            table = datasets.Dataset.from_parquet(path, keep_in_memory=True)
        else:
            table = datasets.Dataset.from_csv(path, keep_in_memory=True, **_csv_options(path))
    except DataError:
        raise
    except Exception as err:  # pyarrow / pandas raise many types; name the file and pass the reason on
        while err.__cause__ is not None:  # datasets wraps the parser's error ("Expected 3 fields in line 3")
            err = err.__cause__
        raise DataError(f"{path}: cannot read as {builder} ({type(err).__name__}: {err})") from None
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    records = table.to_list()
    return _finish(RawData(path, records, [f"record {i}" for i in range(1, len(records) + 1)], limit))


def _csv_options(path: str) -> dict:
    """Every CSV column read as text, as written: no number inference (an answer ``4`` stays the
    string ``"4"``), no ``NA``/``null``/``None`` turned into missing values (an empty cell is ``""``);
    a UTF-8 byte-order mark is accepted. A byte that is not UTF-8 is a :class:`DataError` naming
    its line."""
    import csv

    import datasets

    with _open_binary(path) as handle:  # every line UTF-8 (the line named), before pandas reads it
        for number, raw_line in enumerate(handle, start=1):
            _decode(raw_line, path, number)
    with open(path, encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise DataError(f"{path}: no header line (expected column names such as prompt,chosen,rejected)")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False, "na_filter": False, "encoding": "utf-8-sig"}


def _read_hub(name: str, limit: Optional[int]) -> RawData:
    import datasets

    repo, _, split = name.partition(":")
    split = split or "train"
    if limit is not None:
        split = f"{split}[:{limit}]"
    try:
        table = datasets.load_dataset(repo, split=split)
    except Exception as err:  # network, missing repo, missing split...: all end here with the id named
        raise DataError(
            f"{name}: not a local file, and loading it as a Hub dataset failed ({type(err).__name__}: {err}). "
            "Check the path, or the network / HF_HUB_OFFLINE for Hub datasets.") from None
    records = table.to_list()
    return _finish(RawData(name, records, [f"record {i}" for i in range(1, len(records) + 1)], limit))


def _finish(raw: RawData) -> RawData:
    if not raw.records:
        raise DataError(f"{raw.source}: no records")
    if os.path.isfile(raw.source):
        raw.base_dir = os.path.dirname(os.path.abspath(raw.source))
    return raw
