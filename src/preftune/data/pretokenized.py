"""Pre-tokenised preference records: token ids given by the user, used as they are (no re-tokenisation).

Field sets read (format ``pretokenized``, detected by :mod:`preftune.data.detect`):

* ``prompt_ids``, ``chosen_ids``, ``rejected_ids``: TRL 1.16 ``DPOTrainer``'s tokenised rows (what its
  ``_prepare_dataset`` writes and its collator reads): the prompt, then each completion alone.
* ``chosen_ids``, ``rejected_ids`` without ``prompt_ids``: TRL 1.16 ``RewardTrainer``'s pre-tokenised
  data, each a whole sequence (prompt included).
* ``chosen_input_ids``, ``rejected_input_ids`` (TRL's older reward columns, which its RewardTrainer
  still reads with a deprecation warning; also the columns of TRL's CPO / ORPO tokenised rows), whole
  sequences; with ``prompt_input_ids`` both must start with it.

Whole sequences are split at their longest common leading token run (leaving at least one token on
each side), which is the shared prompt the engine runs once; a pair sharing no leading token is an
error (the first completion token would have no position predicting it: give ``prompt_ids``, or
tokenise with the tokenizer's BOS). The ids are kept exactly: no EOS is appended (TRL appends none to
pre-tokenised data either), no special token added or removed. Each id is checked against the
tokenizer's vocabulary, the truncation rules of :mod:`preftune.data.truncation` apply as for text,
and every cut and drop is counted in :class:`~preftune.data.truncation.TokenizeStats`.
"""

from __future__ import annotations

from typing import Any, Optional

from preftune.types import TokenizedPair

from .errors import DataError, where
from .render import check_no_images
from .truncation import TokenizeStats, record_margin, truncate_pair
from .validate import Here

__all__ = ["ID_FIELDS", "from_pretokenized", "is_pretokenized", "tokenize_pretokenized"]
CURRENT = ("prompt_ids", "chosen_ids", "rejected_ids")
LEGACY = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
ID_FIELDS = CURRENT  # the keys of a normalised pre-tokenised record
TEXT_FIELDS = ("prompt", "chosen", "rejected", "completion", "messages", "conversations")


def _ids(here: Here, record: dict, name: str, allow_empty: bool = False) -> list[int]:
    value = here.get(record, name)
    if not isinstance(value, list):
        raise here.fail(name, f"expected a list of token ids, got {type(value).__name__}")
    for index, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise here.fail(f"{name}[{index}]", f"expected a token id (an integer >= 0), got {token!r:.40}")
    if not value and not allow_empty:
        raise here.fail(name, "empty: no tokens")
    return list(value)


def _common_prefix(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b)) - 1  # leave at least one token on each side
    return next((i for i in range(limit) if a[i] != b[i]), max(limit, 0))


def from_pretokenized(here: Here, record: dict) -> dict:
    """One record's ids -> ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (see the module docstring).

    Raises :class:`DataError` (file, record, field) for a value that is not a list of ids, an empty
    completion, whole sequences that do not start with the given ``prompt_input_ids``, or a pair with
    no prompt tokens.
    """
    names = CURRENT if record.get("chosen_ids") is not None else LEGACY
    chosen, rejected = _ids(here, record, names[1]), _ids(here, record, names[2])
    if names == CURRENT and record.get("prompt_ids") is not None:
        prompt = _ids(here, record, "prompt_ids", allow_empty=True)
    elif names == LEGACY and record.get("prompt_input_ids") is not None:
        prompt = _ids(here, record, "prompt_input_ids", allow_empty=True)
        for name, ids in ((names[1], chosen), (names[2], rejected)):
            if ids[:len(prompt)] != prompt or len(ids) == len(prompt):
                raise here.fail(name, "does not start with prompt_input_ids followed by a completion; the "
                                      f"{names[1]} / {names[2]} columns hold whole sequences (prompt + completion)")
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    else:
        shared = _common_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if not prompt:
        raise here.fail(names[0] if record.get(names[0]) is not None else names[1],
                        "no prompt tokens: the first completion token would have no position predicting it; give "
                        f"{names[0]} (at least one token, e.g. the BOS), or whole sequences that share their start")
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def text_fields_beside(record: dict) -> bool:
    """True when a pre-tokenised record also holds text fields (not read: the ids are used)."""
    return any(record.get(name) is not None for name in TEXT_FIELDS)


def is_pretokenized(records: list[dict]) -> bool:
    """True for normalised pre-tokenised records (the output of :func:`from_pretokenized`)."""
    return bool(records) and all(name in records[0] for name in ID_FIELDS)


def _vocab_size(tokenizer: Any) -> Optional[int]:
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    try:
        return len(inner)
    except TypeError:
        return None


def tokenize_pretokenized(records: list[dict], tokenizer: Any, data_args: Any, *, locations: list[str],
                          source: str) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Pre-tokenised records -> :class:`TokenizedPair` list and counts, truncated as text records are.

    ``records``: ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` dicts (:func:`from_pretokenized`),
    optionally with ``margin``. ``data_args``: ``max_length``, ``max_prompt_length``,
    ``max_completion_length``, ``truncation_mode``. A prompt starting with the tokenizer's BOS keeps it
    under ``keep_end``, as a tokenised text prompt does.
    Raises :class:`DataError` (file, record, field ``name[index]``) for an id outside the tokenizer's
    vocabulary, or for a record with images.
    """
    vocab = _vocab_size(tokenizer)
    bos = getattr(getattr(tokenizer, "tokenizer", tokenizer), "bos_token_id", None)
    stats = TokenizeStats(records=len(records))
    pairs = []
    for i, (record, location) in enumerate(zip(records, locations)):
        check_no_images(record, tokenizer, location, source)
        if vocab is not None:
            for name in ID_FIELDS:
                bad = next((j for j, token in enumerate(record[name]) if token >= vocab), None)
                if bad is not None:
                    raise DataError(f"{where(source, location, f'{name}[{bad}]')}: token id {record[name][bad]} is "
                                    f"outside the tokenizer's vocabulary ({vocab} tokens); were the ids made with "
                                    "another tokenizer?")
        margin = record_margin(record, location, source)
        prompt, chosen, rejected, prompt_cut, cut, drop = truncate_pair(
            record["prompt_ids"], record["chosen_ids"], record["rejected_ids"],
            max_length=data_args.max_length, max_prompt_length=data_args.max_prompt_length,
            max_completion_length=data_args.max_completion_length, truncation_mode=data_args.truncation_mode,
            bos_id=bos if bos is not None and record["prompt_ids"][:1] == [bos] else None)
        stats.prompts_truncated += prompt_cut
        stats.completions_truncated += cut
        if drop:
            stats.dropped[drop] += 1
            continue
        stats.identical += chosen == rejected
        stats.kept_index.append(i)
        pairs.append(TokenizedPair(prompt_ids=list(prompt), chosen_ids=list(chosen), rejected_ids=list(rejected),
                                   margin=margin, location=where(source, location)))
    stats.kept = len(pairs)
    return pairs, stats
