"""Tokenising normalised preference records into :class:`preftune.types.TokenizedPair`.

The completion tokens are exactly the tokens the model is scored on. One rule for special tokens
(``docs/python-api.md``, "Special tokens"; ``tests/test_special_tokens.py`` checks it against TRL 1.16
on tokenizers that add a BOS, define one without adding it, have none, and append an EOS):

* decoder-only models, text records: the prompt is encoded *with* the tokenizer's special tokens (a
  BOS exactly where the tokenizer adds one, as ``tokenizer(prompt)`` gives it at generation; an EOS
  some tokenizers would append is removed), each completion *without* special tokens, and the EOS id
  is appended once (not when the text already ends with it). This is TRL's ``DPOTrainer`` rule;
  TRL's CPO / ORPO trainers also prepend a BOS the tokenizer defines but does not add (SmolLM2 and
  GPT-2 style tokenizers), which preftune does not (a deliberate difference).
* decoder-only models, message records: the chat template renders the prompt with
  ``add_generation_prompt=True`` and the whole conversation without it; the completion text is the
  full rendering minus the prompt rendering. Both are encoded *without* special tokens, as the
  template writes its own (so no doubled BOS). When the completion ends with the EOS token followed
  only by template whitespace (SmolLM2 / ChatML: ``"...<|im_end|>\\n"``), the whitespace is cut, so
  the completion ends with exactly one EOS; otherwise EOS is appended once.
* encoder–decoder models (``keep_special_tokens``, T5, BART ...: the option
  :meth:`preftune.engine.kinds.seq2seq.Seq2SeqKind.tokenize_options` gives): prompt and each
  completion are encoded *with* the tokenizer's special tokens and nothing is added or removed (T5:
  ``text </s>``; BART: ``<s> text </s>``; a tokenizer that appends no EOS: no EOS), exactly as TRL's
  CPO / ORPO trainers tokenise them (TRL's ``DPOTrainer`` has no encoder–decoder path); the prompt is
  the encoder input, the decoder starts from the model's ``decoder_start_token_id``.

Prompt and completion are tokenised **separately** and concatenated. Encoding the joined text can
merge tokens across the boundary (e.g. ``"A:" + " B"``); the separate encoding is kept because it
gives a prompt identical for chosen and rejected (the shared-prompt layout needs that) and matches
what the model sees at generation (prompt encoded alone, then sampled tokens). How many pairs
would encode differently when joined is counted and reported.

Truncation follows TRL's CPO/DPO order (``CPOTrainer.tokenize_row``): completions are first capped
at ``max_completion_length``; then, if prompt + longer completion exceeds ``max_length``, the prompt
is cut to ``max_prompt_length`` (``keep_end`` keeps its end, ``keep_start`` its start); then each
completion is cut to ``max_length - len(prompt)`` tokens (keeping its start; a cut completion loses
its EOS). Unlike TRL, ``keep_end`` keeps a leading BOS the tokenizer added. Without ``max_length``
the prompt is cut to ``max_prompt_length`` whenever longer. A pair whose completion would become
empty is dropped. Every cut and drop is counted in :class:`TokenizeStats`.

Records with ``images`` / ``rejected_images`` (:mod:`preftune.data.media`) are an error here: a
text-only tokenizer cannot encode them, and they are never dropped silently.
"""

from __future__ import annotations

from typing import Any, Optional

from preftune.types import TokenizedPair

from .errors import DataError, where
from .pretokenized import is_pretokenized, tokenize_pretokenized
from .render import check_no_images, render_records
from .truncation import TokenizeStats, record_margin, truncate_pair
from .vision import is_processor, tokenize_image_records

__all__ = ["TokenizeStats", "tokenize_records", "truncate_pair"]


class _Encoder:
    """Batch encoding with the special-token facts of one tokenizer worked out once."""

    def __init__(self, tokenizer: Any, source: str, keep_special_tokens: bool = False):
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise DataError(f"{source}: the tokenizer has no EOS token; completions need one to end")
        probe_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        probe_plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        self.adds_bos = bos is not None and probe_special[:1] == [bos] and probe_plain[:1] != [bos]
        self.bos_id = bos if self.adds_bos else None
        self.adds_eos = probe_special[-1:] == [self.eos_id] and probe_plain[-1:] != [self.eos_id]
        # keep_special_tokens (encoder–decoder models, their kind's tokenize_options): prompts and completions
        # are the tokenizer's encoding with its special tokens, nothing added or removed (T5: "text </s>";
        # BART: "<s> text </s>"; a tokenizer without a post-processor: the bare text), as the model was
        # trained and as TRL's CPO / ORPO trainers tokenise them
        self.keep_special = keep_special_tokens

    def special(self, item: tuple) -> bool:
        """Whether a rendered record's texts are encoded with the tokenizer's special tokens."""
        return True if self.keep_special else item[3]

    def encode(self, texts: list[str], special: bool) -> list[list[int]]:
        if not texts:
            return []
        ids = self.tok(texts, add_special_tokens=special)["input_ids"]
        if special and self.adds_eos and not self.keep_special:
            ids = [seq[:-1] if seq[-1:] == [self.eos_id] else seq for seq in ids]
        if special and self.adds_bos and not self.keep_special:  # a prompt starting with the BOS text: one BOS
            ids = [seq[1:] if seq[:2] == [self.bos_id, self.bos_id] else seq for seq in ids]
        return [list(seq) for seq in ids]

    def end(self, ids: list[int]) -> list[int]:
        """A completion as scored: one EOS at the end (decoder-only); as encoded (encoder–decoder)."""
        return ids if self.keep_special or ids[-1:] == [self.eos_id] else ids + [self.eos_id]


def _encode_completions(encoder: _Encoder, rendered: list, side: int) -> list[list[int]]:
    """Completion ids of every rendered record (``side`` 1: chosen, 2: rejected): without special tokens,
    except with ``keep_special_tokens`` (encoder–decoder models), which take the tokenizer's own."""
    return encoder.encode([item[side] for item in rendered], encoder.keep_special)


def tokenize_records(records: list[dict], tokenizer: Any, data_args: Any, *, locations: Optional[list[str]] = None,
                     source: str = "data", keep_special_tokens: bool = False
                     ) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenise and truncate normalised records (see the module docstring for the exact rules).

    ``records``: ``{"prompt", "chosen", "rejected"}`` dicts, all strings or all message lists (the
    output of :func:`preftune.data.formats.normalise`). ``data_args``: a
    :class:`preftune.config.DataArguments` (``max_length``, ``max_prompt_length``,
    ``max_completion_length``, ``truncation_mode`` are read). ``locations`` / ``source`` name
    records in errors. ``keep_special_tokens`` (the tokenisation option of encoder–decoder models,
    ``kind.tokenize_options(model)``): text records keep the tokenizer's own special tokens on prompt
    and completions (see the module docstring). Returns the kept pairs (lists of token ids, with the
    record's ``margin``) and the counts.
    Raises :class:`DataError` for a tokenizer without EOS or chat template (when needed), a
    chat template whose prompt rendering is not a prefix of the full rendering, or a record with
    images (file, record, field ``images``).
    """
    locations = locations or [f"record {i}" for i in range(1, len(records) + 1)]
    if is_pretokenized(records):  # token ids given by the user: used as they are (data/pretokenized.py)
        return tokenize_pretokenized(records, tokenizer, data_args, locations=locations, source=source)
    if is_processor(tokenizer):  # a vision–language processor: images expanded into their tokens (data/vision.py)
        return tokenize_image_records(records, tokenizer, data_args, locations=locations, source=source)
    for record, location in zip(records, locations):
        check_no_images(record, tokenizer, location, source)
    margins = [record_margin(record, location, source) for record, location in zip(records, locations)]
    encoder = _Encoder(tokenizer, source, keep_special_tokens)
    rendered = render_records(records, tokenizer, locations, source)
    stats = TokenizeStats(records=len(records))
    # Encode in batches: prompts that take special tokens, those that do not, then the completions.
    prompt_ids: list[list[int]] = [[] for _ in rendered]
    joined: dict[tuple[int, int], list[int]] = {}
    for special in (True, False):
        index = [i for i, item in enumerate(rendered) if encoder.special(item) == special]
        for i, ids in zip(index, encoder.encode([rendered[i][0] for i in index], special)):
            prompt_ids[i] = ids
        for side in (1, 2):
            texts = [rendered[i][0] + rendered[i][side] for i in index]
            for i, ids in zip(index, encoder.encode(texts, special)):
                joined[i, side] = ids
    chosen_ids, rejected_ids = (_encode_completions(encoder, rendered, side) for side in (1, 2))
    pairs = []
    for i in range(len(rendered)):
        sides = (chosen_ids[i], rejected_ids[i])
        if not encoder.keep_special:  # prompt and completion are never read as one text (encoder–decoder)
            stats.boundary_mismatches += any(joined[i, s + 1] != prompt_ids[i] + sides[s] for s in (0, 1))
        prompt, chosen, rejected, prompt_cut, cut, drop = truncate_pair(
            prompt_ids[i], encoder.end(sides[0]), encoder.end(sides[1]),
            max_length=data_args.max_length, max_prompt_length=data_args.max_prompt_length,
            max_completion_length=data_args.max_completion_length, truncation_mode=data_args.truncation_mode,
            bos_id=encoder.bos_id)
        stats.prompts_truncated += prompt_cut
        stats.completions_truncated += cut
        if drop:
            stats.dropped[drop] += 1
            continue
        stats.identical += chosen == rejected and records[i].get("label") is None
        stats.kept_index.append(i)
        pairs.append(TokenizedPair(prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected, margin=margins[i],
                                   location=where(source, locations[i]), label=records[i].get("label")))
    stats.kept = len(pairs)
    return pairs, stats
