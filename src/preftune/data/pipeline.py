"""The data entry point of the trainer: files / Hub ids / demo set -> tokenised train and eval pairs.

Several ``--dataset`` files are read one by one (each with its own ``#N`` and its own detected
format, or its own ``--dataset_format``), renamed with ``--columns``, normalised, and concatenated
in the order given; the ``--eval_ratio`` split is drawn over the concatenation. The report has a
line per file (records, format) and, with more than one file, the tokenisation counts per file
before the totals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from preftune.losses.table import TABLE, UNPAIRED_LOGPS
from preftune.types import TokenizedPair

from .columns import parse_columns, rename_columns
from .errors import DataError
from .formats import FormattedData, normalise
from .loading import RawData, load_raw
from .split import split_indices
from .tokenize import TokenizeStats, tokenize_records

logger = logging.getLogger("preftune.data")
UNPAIRED_LOSSES = tuple(name for name, spec in TABLE.items() if spec.consumes == UNPAIRED_LOGPS)  # kto, apo_zero_unpaired


class PairList(list):
    """A list of :class:`TokenizedPair` that also names the files whose records have no rejected answer
    (``without_rejected``: sources of ``prompt_completion`` data, training or evaluation), so that
    :func:`check_preference_signal`, which gets only the training pairs and the loss, can refuse them
    for any loss but ``sft``."""

    without_rejected: tuple = ()


@dataclass
class PreferenceData:
    """Tokenised preference data.

    ``train`` / ``eval``: lists of :class:`TokenizedPair` (``eval`` is None without
    ``--eval_ratio`` / ``--eval_file``). ``report``: the log lines (format detection, split,
    tokenisation counts), newline-joined. ``format``: the training data's format (``standard``,
    ``conversational``, ``implicit_prompt``, ``mt_triplets``, ``prompt_completion``, ``swift2``, ``swift3``,
    ``sharegpt``, ``alpaca``; several files of different formats: joined with ``+``). ``train_files`` /
    ``eval_files``: ``(source, format, stats)`` per file, in the order given. ``train`` is a
    :class:`PairList` (it names the files without a rejected answer).
    """

    train: list[TokenizedPair]
    eval: Optional[list[TokenizedPair]]
    report: str
    format: str
    train_stats: Optional[TokenizeStats] = None
    eval_stats: Optional[TokenizeStats] = None
    train_files: list[tuple[str, str, TokenizeStats]] = field(default_factory=list)
    eval_files: list[tuple[str, str, TokenizeStats]] = field(default_factory=list)


def _subset(data: FormattedData, index: list[int]) -> FormattedData:
    return FormattedData(data.source, data.format, data.kind, [data.records[i] for i in index],
                         [data.locations[i] for i in index], limit=data.limit)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _formats_for(data_args: Any, count: int) -> list[Optional[str]]:
    """One forced format (or None = detect) per --dataset file."""
    names = _as_list(getattr(data_args, "dataset_format", None))
    if not names:
        return [None] * count
    if len(names) == 1:
        return names * count
    if len(names) != count:
        raise DataError(f"--dataset_format: {len(names)} names for {count} --dataset files; give one name for "
                        "all, or one per file (auto = detect)")
    return names


#: records per tokenisation block: a file with more records is tokenised block by block under a progress bar
PROGRESS_BLOCK = 4000


def _tokenize_file(part: FormattedData, tokenizer: Any, data_args: Any, label: str,
                   tokenize_options: dict[str, Any]) -> tuple[list[TokenizedPair], TokenizeStats]:
    """:func:`tokenize_records` over one file; more than :data:`PROGRESS_BLOCK` records: block by block with a
    tqdm bar (rate and time left; ``TQDM_DISABLE=1``, set by ``--disable_tqdm``, hides it) and the counts summed."""
    records, n = part.records, len(part.records)
    if n <= PROGRESS_BLOCK:
        return tokenize_records(records, tokenizer, data_args, locations=part.locations, source=part.source,
                                **tokenize_options)
    import os

    from tqdm.auto import tqdm

    disable = os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")
    kept: list[TokenizedPair] = []
    blocks: list[TokenizeStats] = []
    index: list[int] = []
    with tqdm(total=n, desc=f"{label}: tokenising {part.source}", unit="record", disable=disable) as bar:
        for start in range(0, n, PROGRESS_BLOCK):
            stop = min(n, start + PROGRESS_BLOCK)
            pairs, stats = tokenize_records(records[start:stop], tokenizer, data_args, locations=part.locations[start:stop],
                                            source=part.source, **tokenize_options)
            kept += pairs
            blocks.append(stats)
            index += [start + i for i in stats.kept_index]
            bar.update(stop - start)
    total = TokenizeStats.combine(blocks)
    total.kept_index = index
    return kept, total


def _tokenize(parts: list[FormattedData], tokenizer: Any, data_args: Any, label: str, say,
              tokenize_options: dict[str, Any]) -> tuple:
    pairs = PairList()
    pairs.without_rejected = tuple(part.source for part in parts
                                   if part.format == "prompt_completion" and part.records)
    files = []
    for part in parts:
        if not part.records:
            continue
        kept, stats = _tokenize_file(part, tokenizer, data_args, label, tokenize_options)
        pairs += kept
        files.append((part.source, part.format, stats))
    if len(files) > 1:
        for source, _, stats in files:
            say(stats.summary(f"{label}: {source}"))
    total = TokenizeStats.combine([stats for _, _, stats in files])
    say(total.summary(label))
    return pairs, total, files


def build_datasets(data_args: Any, tokenizer: Any, seed: int, *, train_raw: Optional[RawData] = None,
                   eval_raw: Optional[RawData] = None, **tokenize_options: Any) -> PreferenceData:
    """Load, validate, split and tokenise the data named by ``data_args``.

    ``tokenize_options``: keyword arguments of :func:`preftune.data.tokenize.tokenize_records` saying
    how text is tokenised for the model's kind (``kind_for(model).tokenize_options(model)``, e.g.
    ``keep_special_tokens=True`` for encoder–decoder models); none: decoder-only tokenisation.

    ``train_raw`` / ``eval_raw``: records already in memory (:func:`records_to_raw`, e.g. the Python
    API's ``train_dataset`` / ``eval_dataset``), used instead of ``--dataset`` / ``--eval_file``.

    ``data_args``: :class:`preftune.config.DataArguments` (``dataset`` None -> the demo set shipped
    in ``preftune/resources/demo.jsonl``; a string or a list of files). ``seed`` fixes the
    ``--eval_ratio`` split and ``--dataset_sample random``.
    Every report line is also logged (logger ``preftune.data``, INFO).
    Raises :class:`DataError` for bad data, for ``--eval_file`` together with ``--eval_ratio``, or
    when tokenisation drops every training pair.
    """
    eval_specs = _as_list(data_args.eval_file)
    if (eval_specs or eval_raw is not None) and data_args.eval_ratio > 0:
        raise DataError("give --eval_file or --eval_ratio, not both")
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        logger.info(line)

    try:
        columns = parse_columns(getattr(data_args, "columns", None))
    except ValueError as err:
        raise DataError(str(err)) from None
    sample = getattr(data_args, "dataset_sample", "first")
    specs = _as_list(data_args.dataset) or [None]
    raws = [load_raw(spec, sample=sample, seed=seed) for spec in specs] if train_raw is None else [train_raw]
    eval_raws = ([load_raw(spec, sample=sample, seed=seed) for spec in eval_specs] if eval_raw is None
                 else [eval_raw])
    rename_columns(raws + eval_raws, columns)
    forced = _formats_for(data_args, len(raws))
    parts = [normalise(raw, data_args, fmt=fmt or "auto") for raw, fmt in zip(raws, forced)]
    for part in parts:
        say(part.describe())
    total = sum(len(part.records) for part in parts)
    if len(parts) > 1:
        say(f"data: {len(parts)} files, {total} records (" +
            ", ".join(f"{part.source}: {len(part.records)}" for part in parts) + ")")
    evaluation: Optional[list[FormattedData]] = None
    if data_args.eval_ratio > 0:
        train_index, eval_index = split_indices(total, data_args.eval_ratio, seed,
                                                source=" + ".join(part.source for part in parts))
        offsets = [sum(len(p.records) for p in parts[:i]) for i in range(len(parts))]

        def pick(index: list[int]) -> list[FormattedData]:
            return [_subset(part, [i - start for i in index if start <= i < start + len(part.records)])
                    for part, start in zip(parts, offsets)]

        parts, evaluation = pick(train_index), pick(eval_index)
        say(f"data: eval split: {len(eval_index)} of {total} records held out "
            f"(eval_ratio {data_args.eval_ratio}, seed {seed})")
    elif eval_raws:
        eval_format = (forced[0] if len(set(forced)) == 1 else None) or "auto"  # one name given: eval too
        evaluation = [normalise(raw, data_args, fmt=eval_format) for raw in eval_raws]
        for part in evaluation:
            say(part.describe().replace("data: ", "eval data: ", 1))

    train_pairs, train_stats, train_files = _tokenize(parts, tokenizer, data_args, "data", say, tokenize_options)
    if not train_pairs:
        raise DataError(f"{' + '.join(part.source for part in parts)}: every training pair was dropped at "
                        f"tokenisation ({train_stats.summary('data')}); raise --max_length or set --max_prompt_length")
    eval_pairs, eval_stats, eval_files = None, None, []
    if evaluation is not None:
        eval_pairs, eval_stats, eval_files = _tokenize(evaluation, tokenizer, data_args, "eval data", say,
                                                         tokenize_options)
        train_pairs.without_rejected += tuple(s for s in eval_pairs.without_rejected
                                              if s not in train_pairs.without_rejected)
    fmt = "+".join(dict.fromkeys(part.format for part in parts))
    return PreferenceData(train_pairs, eval_pairs, "\n".join(lines), fmt, train_stats, eval_stats,
                          train_files, eval_files)


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


def refuse_missing_rejected(pairs: list[TokenizedPair], loss: str, action: str = "train") -> None:
    """Raise :class:`DataError` naming the file when ``pairs`` (a :class:`PairList`) came from
    prompt/completion records (no rejected answer) and ``loss`` is not ``sft``; ``action``
    ("train", "evaluate") words the message."""
    without = getattr(pairs, "without_rejected", ())
    if without and loss != "sft":
        raise DataError(f"{without[0]}: prompt/completion records (format prompt_completion, TRL's SFT format) have "
                        f"no rejected answer; only --loss sft can {action} on them, not --loss {loss}. For --loss "
                        f"{loss} give preference pairs (prompt/chosen/rejected)")


def check_preference_signal(pairs: list[TokenizedPair], loss: str) -> int:
    """Identical pairs (chosen tokens == rejected tokens) carry no preference signal: count them.

    ``pairs``: the training pairs; ``loss``: the ``--loss`` name. ``sft`` reads only ``chosen`` and
    is not checked; ``rm`` skips such pairs itself (the value-head kind's ``prepare_data``), so
    only the all-identical error applies to it. Some identical pairs: a warning naming the first
    (they stay in training: CPO/ORPO still learn from their NLL term). Returns their number.

    Raises :class:`DataError` (naming the first pair's file and record) when *every* training pair is
    identical: a preference loss would learn nothing (DPO's loss is constant at log 2). Also raises it,
    naming the file, when the data (training or evaluation, :attr:`PairList.without_rejected`) holds
    prompt/completion records and ``loss`` is not ``sft``: they have no rejected answer.
    """
    refuse_missing_rejected(pairs, loss)
    if loss in UNPAIRED_LOSSES or not pairs:
        return 0  # KTO: a paired record is unpaired, an unpaired one gets its KL partner (preftune.data.unpaired)
    labelled = next((pair for pair in pairs if pair.label is not None), None)
    if labelled is not None:
        raise DataError(f"{labelled.location or 'training data'}, field 'label': unpaired records (one completion "
                        f"labelled desirable or undesirable, KTO's format) train with --loss "
                        f"{' / '.join(UNPAIRED_LOSSES)}, not --loss {loss}; give preference pairs "
                        "(prompt/chosen/rejected) for it")
    if loss == "sft":
        return 0
    identical = [pair for pair in pairs if pair.chosen_ids == pair.rejected_ids]
    if not identical:
        return 0
    first = identical[0].location or "training data, record 1"
    if len(identical) == len(pairs):
        raise DataError(f"{first}, fields 'chosen' / 'rejected': identical tokens, as in all {len(pairs)} training "
                        f"pairs; --loss {loss} learns from the difference between chosen and rejected, so this data "
                        "teaches it nothing (if truncation made them equal, raise --max_length / "
                        "--max_completion_length)")
    if loss != "rm":
        logger.warning("data: %d of %d training pairs have identical chosen and rejected tokens (first: %s); they "
                       "carry no preference signal and are kept", len(identical), len(pairs), first)
    return len(identical)
