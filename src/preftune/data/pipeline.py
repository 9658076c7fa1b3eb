"""The data entry point of the trainer: file / Hub id / demo set -> tokenised train and eval pairs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from preftune.types import TokenizedPair

from .errors import DataError
from .formats import FormattedData, normalise
from .loading import RawData, load_raw
from .split import split_indices
from .tokenize import TokenizeStats, tokenize_records

logger = logging.getLogger("preftune.data")


@dataclass
class PreferenceData:
    """Tokenised preference data.

    ``train`` / ``eval``: lists of :class:`TokenizedPair` (``eval`` is None without
    ``--eval_ratio`` / ``--eval_file``). ``report``: the log lines (format detection, split,
    tokenisation counts), newline-joined. ``format``: the training data's format
    (``standard``, ``conversational``, ``implicit_prompt`` or ``mt_triplets``).
    """

    train: list[TokenizedPair]
    eval: Optional[list[TokenizedPair]]
    report: str
    format: str
    train_stats: Optional[TokenizeStats] = None
    eval_stats: Optional[TokenizeStats] = None


def _subset(data: FormattedData, index: list[int]) -> FormattedData:
    return FormattedData(data.source, data.format, data.kind, [data.records[i] for i in index],
                         [data.locations[i] for i in index], limit=data.limit)


def build_datasets(data_args: Any, tokenizer: Any, seed: int, *, train_raw: Optional[RawData] = None,
                   eval_raw: Optional[RawData] = None) -> PreferenceData:
    """Load, validate, split and tokenise the data named by ``data_args``.

    ``data_args``: :class:`preftune.config.DataArguments` (``dataset`` None -> the demo set shipped
    in ``preftune/resources/demo.jsonl``). ``seed`` fixes the ``--eval_ratio`` split.
    ``train_raw`` / ``eval_raw``: records already in memory (:func:`records_to_raw`, e.g. the
    Python API's ``train_dataset``), used instead of ``--dataset`` / ``--eval_file``.
    Every report line is also logged (logger ``preftune.data``, INFO).
    Raises :class:`DataError` for bad data, for ``--eval_file`` together with ``--eval_ratio``, or
    when tokenisation drops every training pair.
    """
    if (data_args.eval_file or eval_raw is not None) and data_args.eval_ratio > 0:
        raise DataError("give --eval_file or --eval_ratio, not both")
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        logger.info(line)

    train = normalise(train_raw if train_raw is not None else load_raw(data_args.dataset), data_args)
    say(train.describe())
    evaluation: Optional[FormattedData] = None
    if data_args.eval_ratio > 0:
        train_index, eval_index = split_indices(len(train.records), data_args.eval_ratio, seed, source=train.source)
        train, evaluation = _subset(train, train_index), _subset(train, eval_index)
        say(f"data: eval split: {len(eval_index)} of {len(train_index) + len(eval_index)} records held out "
            f"(eval_ratio {data_args.eval_ratio}, seed {seed})")
    elif data_args.eval_file or eval_raw is not None:
        evaluation = normalise(eval_raw if eval_raw is not None else load_raw(data_args.eval_file), data_args)
        say(evaluation.describe().replace("data: ", "eval data: ", 1))

    train_pairs, train_stats = tokenize_records(train.records, tokenizer, data_args, locations=train.locations,
                                                source=train.source)
    say(train_stats.summary("data"))
    if not train_pairs:
        raise DataError(f"{train.source}: every training pair was dropped at tokenisation "
                        f"({train_stats.summary('data')}); raise --max_length or set --max_prompt_length")
    eval_pairs, eval_stats = None, None
    if evaluation is not None:
        eval_pairs, eval_stats = tokenize_records(evaluation.records, tokenizer, data_args,
                                                  locations=evaluation.locations, source=evaluation.source)
        say(eval_stats.summary("eval data"))
    return PreferenceData(train_pairs, eval_pairs, "\n".join(lines), train.format, train_stats, eval_stats)


def records_to_raw(records: Any, source: str) -> RawData:
    """Records in memory -> :class:`RawData` (the in-memory entry point of :func:`build_datasets`).

    ``records``: a :class:`datasets.Dataset` (read with ``to_list``) or a list/tuple of dicts, in
    any format :func:`preftune.data.formats.normalise` recognises. ``source`` names them in
    messages (e.g. ``"train_dataset"``); records are named ``record 1``, ``record 2`` ... (1-based).
    Raises :class:`DataError` for an empty collection, an element that is not a dict, or another type
    (an ``IterableDataset`` included: preftune tokenises and counts the whole set before training).
    """
    if hasattr(records, "to_list") and hasattr(records, "column_names"):
        records = records.to_list()
    if not isinstance(records, (list, tuple)):
        raise DataError(f"{source}: expected a datasets.Dataset or a list of dicts, got {type(records).__name__}")
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{source}, record {index}: expected a dict, got {type(record).__name__}")
    if not records:
        raise DataError(f"{source}: no records")
    return RawData(source, list(records), [f"record {i}" for i in range(1, len(records) + 1)])
