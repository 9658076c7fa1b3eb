"""Which record format a file holds, from the field set and value types of *all* its records.

Every format has one or more signatures: required fields, each with the value types it may hold.
A record *fits* a signature when every required field is present (not None) with one of those
types; other fields are ignored. When a record fits several signatures and one's required fields
are a strict subset of another's, the smaller one is dropped (``chosen``/``rejected`` strings with
``conversations`` are ShareGPT, not an implicit prompt). Each format then counts the records
that fit it; the format fitting the most records is the file's format, every record is held to
it (a record that does not fit gets an error naming its field). A record holding token ids
(``pretokenized``) is that format whatever text fields it also holds, as TRL's ``RewardTrainer``
uses the ids when present. No record fitting any format, or
two formats fitting equally many records, is an error listing the recognised field sets;
``--dataset_format NAME`` (or ``--columns old=new``) settles it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from .errors import DataError, where

STR, LIST, DICT = (str,), (list,), (dict,)
LABEL = (bool, int)  # KTO's desirable / undesirable label (0 / 1 accepted, checked by preftune.data.unpaired)


@dataclass(frozen=True)
class Signature:
    """One accepted field set of ``format``: ``required`` = ((field, allowed types), ...);
    ``optional`` names the fields the converter also reads (for the listing only)."""

    format: str
    required: tuple[tuple[str, tuple[type, ...]], ...]
    optional: tuple[str, ...] = ()

    @property
    def names(self) -> frozenset:
        """The required field names."""
        return frozenset(name for name, _ in self.required)

    def fits(self, record: dict) -> bool:
        """Every required field present (not None) with an allowed type."""
        return all(isinstance(record.get(name), types) for name, types in self.required)

    def describe(self) -> str:
        """``"query (str), response (str) [+ system, history]"``."""
        text = ", ".join(f"{name} ({'/'.join(t.__name__ for t in types)})" for name, types in self.required)
        return text + (f" [+ {', '.join(self.optional)}]" if self.optional else "")


_SWIFT3_OPTIONAL = ("system", "images", "rejected_images", "margin")
_SHAREGPT_OPTIONAL = ("system", "images")
SIGNATURES = (
    Signature("standard", (("prompt", STR), ("chosen", STR), ("rejected", STR)), ("images",)),
    Signature("conversational", (("prompt", LIST), ("chosen", LIST), ("rejected", LIST)), ("images",)),
    Signature("implicit_prompt", (("chosen", STR), ("rejected", STR))),
    Signature("implicit_prompt", (("chosen", LIST), ("rejected", LIST))),
    Signature("mt_triplets", (("translation", DICT),)),
    # TRL's SFT prompt-completion records (no rejected answer: only --loss sft trains on them)
    Signature("prompt_completion", (("prompt", STR), ("completion", STR))),
    Signature("prompt_completion", (("prompt", LIST), ("completion", LIST))),
    # TRL's unpaired preference format (KTO), and ms-swift / LLaMA-Factory KTO records (messages + label)
    Signature("unpaired", (("prompt", STR), ("completion", STR), ("label", LABEL))),
    Signature("unpaired", (("prompt", LIST), ("completion", LIST), ("label", LABEL))),
    Signature("unpaired", (("messages", LIST), ("label", LABEL)), ("system",)),
    Signature("unpaired", (("conversations", LIST), ("label", LABEL)), ("system",)),
    Signature("swift2", (("query", STR), ("response", STR), ("rejected_response", STR)),
              ("system", "history", "images")),
    Signature("swift3", (("messages", LIST), ("rejected_response", STR + LIST)), _SWIFT3_OPTIONAL),
    Signature("swift3", (("messages", LIST), ("rejected_messages", LIST)), _SWIFT3_OPTIONAL),
    Signature("swift3", (("messages", LIST), ("rejected_images", LIST)), _SWIFT3_OPTIONAL),
    Signature("sharegpt", (("conversations", LIST), ("chosen", STR + DICT), ("rejected", STR + DICT)),
              _SHAREGPT_OPTIONAL),
    Signature("sharegpt", (("messages", LIST), ("chosen", STR + DICT), ("rejected", STR + DICT)),
              _SHAREGPT_OPTIONAL),
    Signature("alpaca", (("instruction", STR), ("chosen", STR), ("rejected", STR)),
              ("input", "system", "history", "images")),
    # token ids (preftune.data.pretokenized): TRL DPOTrainer's tokenised rows, RewardTrainer's whole sequences
    # (chosen_ids / rejected_ids), and the older chosen_input_ids / rejected_input_ids (+ prompt_input_ids)
    Signature("pretokenized", (("prompt_ids", LIST), ("chosen_ids", LIST), ("rejected_ids", LIST))),
    Signature("pretokenized", (("chosen_ids", LIST), ("rejected_ids", LIST))),
    Signature("pretokenized", (("chosen_input_ids", LIST), ("rejected_input_ids", LIST)), ("prompt_input_ids",)),
)
TOKEN_FORMAT = "pretokenized"  # token ids, when present, are what trains (TRL's RewardTrainer rule): text beside them is not read
FORMATS = tuple(dict.fromkeys(s.format for s in SIGNATURES))
ALIASES = {"swift": "swift3", "swift4": "swift3", "trl": "conversational", "llamafactory": "sharegpt",
           "sharegpt_ranking": "sharegpt", "alpaca_ranking": "alpaca", "query_response": "swift2",
           "kto": "unpaired", "tokenized": "pretokenized", "token_ids": "pretokenized"}


def canonical_format(name: str) -> Optional[str]:
    """A format name or alias -> the format name (None for ``auto``). Raises :class:`ValueError`."""
    key = name.strip().lower().replace("-", "_")
    if key in ("auto", ""):
        return None
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        raise ValueError(f"unknown data format {name!r}; choose one of: auto, {', '.join(FORMATS)} "
                         f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return key


def recognised_field_sets() -> str:
    """All signatures, one ``format: fields`` item each, ``;``-separated (one line)."""
    return "; ".join(f"{s.format}: {s.describe()}" for s in SIGNATURES)


def formats_of(record: dict) -> list[str]:
    """The formats whose most specific fitting signatures ``record`` fits (see the module docstring)."""
    fitting = [s for s in SIGNATURES if s.fits(record)]
    if any(s.format == TOKEN_FORMAT for s in fitting):
        return [TOKEN_FORMAT]
    kept = [s for s in fitting if not any(s.names < other.names for other in fitting)]
    return list(dict.fromkeys(s.format for s in kept))


@dataclass
class Detection:
    """The outcome: ``format``, ``first`` (location of the first record fitting it), ``fitting`` /
    ``total`` record counts, ``forced`` (given by ``--dataset_format``)."""

    format: str
    first: str
    fitting: int
    total: int
    forced: bool = False

    def describe(self) -> str:
        """``"forced by --dataset_format"`` or ``"detected from the fields of 998 of 1000 records"``."""
        if self.forced:
            return "forced by --dataset_format"
        return f"detected from the fields of {self.fitting} of {self.total} records"


def detect(records: list[dict], locations: list[str], source: str) -> Detection:
    """Detect the format of ``records`` (see the module docstring).

    Raises :class:`DataError` (naming ``source``) when no record fits a format, or when two
    formats fit equally many records; the message lists the recognised field sets.
    """
    counts: Counter = Counter()
    first: dict[str, str] = {}
    for record, location in zip(records, locations):
        for fmt in formats_of(record):
            counts[fmt] += 1
            first.setdefault(fmt, location)
    if not counts:
        seen = list(dict.fromkeys(name for record in records[:1000] for name in record))
        raise DataError(f"{where(source, locations[0])}: cannot detect the data format: no record fits a known "
                        f"field set (fields found: {', '.join(map(repr, seen[:20])) or 'none'}). Recognised field "
                        f"sets: {recognised_field_sets()}. Rename columns with --columns old=new")
    best = max(counts.values())
    top = [fmt for fmt in counts if counts[fmt] == best]
    if len(top) > 1:
        listed = ", ".join(f"{fmt} ({counts[fmt]} records, first {first[fmt]})" for fmt in top)
        raise DataError(f"{source}: the records fit more than one data format equally: {listed}. Force one with "
                        f"--dataset_format NAME or rename columns with --columns old=new. Recognised field sets: "
                        f"{recognised_field_sets()}")
    return Detection(top[0], first[top[0]], best, len(records))
