"""Detecting, validating and normalising the record formats of preference data.

The format of a file is detected from the field set and value types of all its records
(:mod:`preftune.data.detect`), or forced with ``--dataset_format``; every record is then held to it:

* ``standard``: ``prompt``, ``chosen``, ``rejected`` strings (TRL).
* ``conversational``: ``prompt`` a list of ``{role, content}`` messages, ``chosen`` / ``rejected``
  lists of assistant messages (TRL; the chat template is applied at tokenisation).
* ``implicit_prompt``: only ``chosen`` and ``rejected``, the prompt included in both (TRL's implicit
  prompt; Anthropic HH-RLHF, Bai et al. 2022). Text: the prompt is the longest common prefix, as
  TRL's ``extract_prompt`` takes it (a space before the first difference goes to the completions);
  when that prefix holds a ``"\\n\\nAssistant:"`` marker (HH-RLHF dialogues) it is cut back to the
  last one, so it ends at a turn boundary even when both final replies start alike (an empty final
  reply is kept and counted). Message lists: the prompt is the common leading messages (TRL's rule),
  backed off so both remainders start with an assistant message.
* ``mt_triplets``: ALMA-R preference triplets (``translation`` dict; Xu et al. 2024, "Contrastive
  Preference Optimization"), converted by :func:`preftune.mt.readers.triplets_to_preference_records`
  into standard or conversational records.
* ``prompt_completion``: TRL's SFT records, ``prompt`` and ``completion`` strings, or message
  lists (``completion`` assistant messages). There is no rejected answer, so only ``--loss sft``
  trains on them (:func:`preftune.data.pipeline.check_preference_signal` refuses any other loss).
  The completion becomes ``chosen``; ``rejected`` is an empty completion (:data:`NO_REJECTED_TEXT`,
  or one empty assistant message), which tokenises to the EOS alone, so the rejected side costs one
  token per pair in the shared-prompt layout and the prompt / chosen tokens are exactly those of a
  standard record with the same prompt and chosen. A ``label`` field (TRL's unpaired preference
  format, KTO) is refused: its undesired completions must not be trained on as targets.
* ``unpaired``: KTO's records with one completion and a ``label`` (TRL's unpaired preference format,
  ms-swift / LLaMA-Factory KTO records), see :mod:`preftune.data.unpaired`; ``"label"`` is kept on
  the normalised record.
* ``pretokenized``: token ids instead of text (TRL's tokenised rows), see
  :mod:`preftune.data.pretokenized`; normalised to ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``.
* ``swift2``, ``swift3``, ``sharegpt``, ``alpaca``: ms-swift and LLaMA-Factory data, converted to
  the conversational form by :mod:`preftune.data.ecosystems`.

The output of :func:`normalise` is a list of ``{"prompt", "chosen", "rejected"}`` dicts (strings
or message lists), ready for :func:`preftune.data.tokenize.tokenize_records`, plus ``"images"`` /
``"rejected_images"`` (resolved paths, :mod:`preftune.data.media`) and ``"margin"`` (swift 3.x,
for reward models) where the data has them. Message records keep each message's other keys
(``tool_calls``, ``name`` ...) and the record's ``"tools"`` / ``"chat_template_kwargs"``
(:meth:`preftune.data.validate.Here.template_args`), which the chat template gets at tokenisation
(:mod:`preftune.data.render`), as TRL 1.16 passes them; text records do not use them (counted).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from .detect import FORMATS, Detection, canonical_format, detect, formats_of, recognised_field_sets
from .ecosystems import CONVERTERS, DESCRIPTIONS
from .errors import DataError, where
from .loading import RawData
from .media import IMAGE_FIELDS, record_images
from .pretokenized import from_pretokenized, text_fields_beside
from .unpaired import from_unpaired
from .validate import COMPLETION_ROLES, Here

__all__ = ["FORMATS", "FormattedData", "detect_format", "normalise"]
ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"
PAIR_FIELDS = ("prompt", "chosen", "rejected")
NO_REJECTED_TEXT = ""  # the rejected side of a prompt_completion record: tokenised as the EOS alone


@dataclass
class FormattedData:
    """Records normalised to ``prompt`` / ``chosen`` / ``rejected``.

    ``kind`` is ``"text"`` (strings) or ``"messages"`` (message lists). ``identical`` counts pairs
    whose chosen equals rejected (allowed, but reported). ``notes`` are extra facts for the report;
    ``detection`` says how the format was found; ``selection`` which records were taken
    (``PATH#N``).
    """

    source: str
    format: str
    kind: str
    records: list[dict]
    locations: list[str]
    identical: int = 0
    limit: Optional[int] = None
    notes: list[str] = field(default_factory=list)
    detection: str = ""
    selection: Optional[str] = None

    def describe(self) -> str:
        """One line: source, record count, format, identical pairs and notes."""
        text = f"data: {self.source}: {len(self.records)} records"
        selection = self.selection or (f"first {self.limit} asked" if self.limit is not None else None)
        if selection:
            text += f" ({selection})"
        detail = {"standard": "prompt/chosen/rejected strings",
                  "conversational": "message lists, chat template at tokenisation",
                  "implicit_prompt": (f"texts, prompt = longest common prefix (cut back to the last {ASSISTANT_MARKER!r} "
                                       "where it holds one)"
                                      if self.kind == "text" else "message lists, prompt = shared leading messages"),
                  "mt_triplets": f"ALMA-R translation triplets -> {self.kind} records",
                  "prompt_completion": (f"prompt/completion {'strings' if self.kind == 'text' else 'message lists'}, "
                                        "completion = chosen, no rejected answer: --loss sft only"),
                  "pretokenized": "token ids as given (prompt_ids / chosen_ids / rejected_ids, or whole sequences "
                                  "split at their shared leading tokens)",
                  "unpaired": (f"unpaired prompt/completion/label {'strings' if self.kind == 'text' else 'messages'} "
                               "(KTO: --loss kto / apo_zero_unpaired)")}.get(self.format)
        detail = detail or f"{DESCRIPTIONS[self.format]} -> message lists, chat template at tokenisation"
        if self.detection:
            detail += f"; {self.detection}"
        text += f", format {self.format} ({detail}), {self.identical} with chosen == rejected"
        return "; ".join([text, *self.notes])


def detect_format(record: dict) -> str:
    """Name the format of one record (one of :data:`FORMATS`).

    Raises :class:`DataError` (without location; callers add it) when no format fits, or more
    than one does.
    """
    found = formats_of(record)
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(f"cannot detect the data format (found {', '.join(map(repr, record)) or 'no fields'}); "
                        f"recognised field sets: {recognised_field_sets()}")
    raise DataError(f"the record fits more than one data format: {', '.join(found)}")


def parse_language_pairs(value: Optional[str]) -> Optional[list[str]]:
    """``"de-en, en-de"`` -> ``["de-en", "en-de"]``; ``None`` or blank -> ``None``."""
    if not value:
        return None
    pairs = [part.strip() for part in value.split(",") if part.strip()]
    return pairs or None


def _forced_format(data_args: Any, fmt: Optional[str]) -> Optional[str]:
    if fmt is None:
        names = getattr(data_args, "dataset_format", None) or []
        names = [names] if isinstance(names, str) else names
        fmt = names[0] if len(names) == 1 else None
    if fmt is None:
        return None
    try:
        return canonical_format(fmt)
    except ValueError as err:
        raise DataError(f"--dataset_format: {err}") from None


def normalise(raw: RawData, data_args: Any, fmt: Optional[str] = None) -> FormattedData:
    """Detect the format of ``raw`` from all its records (or take ``fmt`` / a single
    ``data_args.dataset_format``), validate every record and normalise.

    ``data_args`` is a :class:`preftune.config.DataArguments` (``dataset_format``, and
    ``language_pairs``, ``cpo_scorer`` and ``chat_style`` for MT triplets, are read).
    Raises :class:`DataError` naming source, record and field for any record that does not fit,
    and naming the source when no format, or more than one, fits the records.
    """
    forced = _forced_format(data_args, fmt)
    if forced:
        detection = Detection(forced, raw.locations[0], len(raw.records), len(raw.records), forced=True)
    else:
        detection = detect(raw.records, raw.locations, raw.source)
    fmt = detection.format
    if fmt == "mt_triplets":
        out = _from_triplets(raw, data_args)
        out.detection, out.selection = detection.describe(), raw.selection
        return out
    out = FormattedData(raw.source, fmt, "text", [], raw.locations, limit=raw.limit,
                        detection=detection.describe(), selection=raw.selection)
    multi_turn = empty_reply = with_images = unused_template = text_beside = legacy_ids = 0
    for record, location in zip(raw.records, raw.locations):
        here = Here(raw.source, location, fmt, detection.first)
        if fmt == "pretokenized":
            out.kind = "tokens"
            pair = from_pretokenized(here, record)
            text_beside += text_fields_beside(record)
            legacy_ids += record.get("chosen_ids") is None
        elif fmt in CONVERTERS:
            out.kind = "messages"
            pair = CONVERTERS[fmt](here, record)
        elif fmt == "standard":
            pair = {name: here.text(record, name) for name in PAIR_FIELDS}
        elif fmt == "unpaired":
            out.kind = "text" if isinstance(record.get("prompt"), str) else "messages"
            pair = from_unpaired(here, record)
        elif fmt == "prompt_completion":
            out.kind = "text" if isinstance(record.get("prompt"), str) else "messages"
            pair = _from_prompt_completion(here, record)
        elif fmt == "conversational":
            out.kind = "messages"
            pair = {"prompt": here.messages(record, "prompt"),
                    "chosen": here.messages(record, "chosen", assistant_only=True),
                    "rejected": here.messages(record, "rejected", assistant_only=True)}
            if pair["prompt"][-1]["role"] == "assistant":
                raise DataError(f"{where(raw.source, location, 'prompt')}: ends with an assistant message; "
                                "the prompt must end with the turn that chosen/rejected answer")
        else:
            for name in ("prompt", "translation"):
                if record.get(name) is not None:
                    raise DataError(f"{where(raw.source, location, name)}: unexpected here; the dataset has an "
                                    f"implicit prompt (chosen/rejected only, detected from {detection.first})")
            if isinstance(record.get("chosen"), list):
                out.kind = "messages"
                pair = _split_messages(here, here.messages(record, "chosen"), here.messages(record, "rejected"))
            else:
                try:
                    pair = _split_text(here, here.text(record, "chosen"), here.text(record, "rejected"))
                except DataError:  # `"prompt": null` made the records look implicit: name 'prompt'
                    if "prompt" not in record:
                        raise
                    raise DataError(f"{where(raw.source, location, 'prompt')}: null; give the prompt text (without "
                                    "it the prompt is the text chosen and rejected start with, and they share none)"
                                    ) from None
                multi_turn += any(HUMAN_MARKER in pair[name] for name in ("chosen", "rejected"))
                empty_reply += any(not pair[name].strip() for name in ("chosen", "rejected"))
        with_images += _attach_images(here, record, pair, raw.base_dir)
        if fmt not in CONVERTERS and record.get("margin") is not None:
            pair["margin"] = record["margin"]  # reward-model margin (TRL / Llama 2); checked at tokenisation
        template = here.template_args(record)  # tools / chat_template_kwargs: the chat template's, per record
        if template and out.kind == "messages":
            pair.update(template)
        unused_template += bool(template) and out.kind != "messages"
        side = "_ids" if fmt == "pretokenized" else ""
        out.identical += (pair["chosen" + side] == pair["rejected" + side] and "rejected_images" not in pair
                          and fmt != "unpaired")
        out.records.append(pair)
    if empty_reply:
        out.notes.append(f"{empty_reply} pairs with an empty final reply (kept: that completion is the whitespace + EOS)")
    if multi_turn:
        out.notes.append(f"{multi_turn} pairs whose reply after the shared prompt holds a further {HUMAN_MARKER!r} "
                         "turn (kept as is)")
    if unused_template:
        out.notes.append(f"{unused_template} {out.kind} records with tools / chat_template_kwargs, which only a chat "
                         "template reads (not used, as in TRL)")
    if legacy_ids:  # TRL's RewardTrainer warns the same way (its test expects the warning)
        warnings.warn(f"{raw.source}: {legacy_ids} records with the older chosen_input_ids / rejected_input_ids "
                      "columns, deprecated by TRL (they will not be supported in v1 of TRL); preftune reads them as "
                      "chosen_ids / rejected_ids", FutureWarning, stacklevel=2)
    if text_beside:
        out.notes.append(f"{text_beside} records also hold text fields: their token ids are used as given, the text "
                         "is not read (as TRL's RewardTrainer)")
    if with_images:
        out.notes.append(f"{with_images} records with images (need a vision-language processor at tokenisation)")
    return out


def _from_prompt_completion(here: Here, record: dict) -> dict:
    """TRL's prompt-completion record -> a pair with the completion as ``chosen`` and an empty rejected
    completion (see the module docstring); strings or message lists, as the prompt is."""
    if record.get("label") is not None:
        raise here.fail("label", "prompt/completion records with a label are TRL's unpaired preference format "
                                 "(KTO), which preftune does not train; for SFT on every completion drop the "
                                 "field (--columns label=unused_label)")
    if isinstance(record.get("prompt"), str):
        return {"prompt": here.text(record, "prompt"), "chosen": here.text(record, "completion"),
                "rejected": NO_REJECTED_TEXT}
    prompt = here.messages(record, "prompt")
    if prompt[-1]["role"] == "assistant":
        raise here.fail("prompt", "ends with an assistant message; the prompt must end with the turn that the "
                                  "completion answers")
    return {"prompt": prompt, "chosen": here.messages(record, "completion", assistant_only=True),
            "rejected": [{"role": "assistant", "content": NO_REJECTED_TEXT}]}


def _attach_images(here: Here, record: dict, pair: dict, base_dir: Optional[str]) -> bool:
    """Resolve ``images`` / ``image`` / ``rejected_images`` onto ``pair``; check them against image parts."""
    pair.update(record_images(here, record, base_dir))
    if here.image_parts and "images" not in pair:
        raise here.fail("images", f"missing; the messages hold {here.image_parts} image parts")
    if here.image_parts and here.fmt == "conversational" and len(pair["images"]) != here.image_parts:
        raise here.fail("images", f"{len(pair['images'])} images for {here.image_parts} image parts in the messages")
    return any(name in pair for name in IMAGE_FIELDS)


def _split_text(here: Here, chosen: str, rejected: str) -> dict:
    """Text pair -> prompt / chosen / rejected: the prompt is the longest common prefix (TRL's
    ``extract_prompt``), cut back to its last Assistant marker when it holds one (HH-RLHF dialogues).

    TRL's rule, character by character: the prompt ends where chosen and rejected first differ, a space
    just before that point goes to the completions, and when one text is a prefix of the other (or
    both are equal) its last character is left as its completion. On HH-RLHF pairs this gives the same
    prompt unless both final replies start alike (``" Sure, a"`` / ``" Sure, b"``): TRL then moves the
    shared words into the prompt, which cuts inside a reply, so dialogues keep the turn boundary.
    """
    limit = min(len(chosen), len(rejected))
    common = next((i for i in range(limit) if chosen[i] != rejected[i]), None)
    cut = chosen.rfind(ASSISTANT_MARKER, 0, limit if common is None else common)
    # rfind(…, 0, common) only finds markers lying wholly inside the shared prefix.
    if cut >= 0:
        end = cut + len(ASSISTANT_MARKER)
        # An empty final reply is kept (HH-RLHF has a few, e.g. a preferred silent non-answer); the
        # completion is then the reply's whitespace + EOS. normalise() counts them.
    elif common is None:
        end = limit - 1  # one text is a prefix of the other: its last character is its completion (as TRL)
    else:
        end = common - 1 if common > 0 and chosen[common - 1] == " " else common
    if end <= 0:
        raise here.fail("chosen", "chosen and rejected share no leading text; an implicit prompt is the text both "
                                  "start with (TRL's longest common prefix): give a 'prompt' field instead")
    return {"prompt": chosen[:end], "chosen": chosen[end:], "rejected": rejected[end:]}


def _split_messages(here: Here, chosen: list[dict], rejected: list[dict]) -> dict:
    """Message lists: prompt = common leading messages (TRL's ``extract_prompt``), backed off so both
    remainders start with an assistant message; the remainders hold assistant messages and tool results."""
    limit = min(len(chosen), len(rejected)) - 1  # leave at least one message on each side
    shared = next((i for i in range(limit) if chosen[i] != rejected[i]), max(limit, 0))
    while shared > 0 and (chosen[shared]["role"] != "assistant" or rejected[shared]["role"] != "assistant"):
        shared -= 1
    if shared == 0:
        raise here.fail("chosen", "chosen and rejected share no leading messages before an assistant reply; an "
                                  "implicit prompt needs two dialogues that share all but the last reply")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        for index in range(shared, len(messages)):
            if messages[index]["role"] not in COMPLETION_ROLES[True]:
                raise here.fail(f"{name}[{index}].role", f"{messages[index]['role']!r} after the shared messages; "
                                "chosen and rejected must differ only in the final assistant turn (assistant "
                                "messages and their tool results)")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _from_triplets(raw: RawData, data_args: Any) -> FormattedData:
    """Convert ALMA-R triplets through the MT reader, then validate its output as usual."""
    try:
        from preftune.mt.readers import triplets_to_preference_records
    except ImportError as err:
        raise DataError(f"{raw.source}: looks like ALMA-R translation triplets ('translation' field in "
                        f"{raw.locations[0]}), but the MT reader preftune.mt.readers is not available ({err})") from None
    try:
        records, stats = triplets_to_preference_records(
            raw.records, source=raw.source, language_pairs=parse_language_pairs(data_args.language_pairs),
            cpo_scorer=data_args.cpo_scorer, chat_style=bool(data_args.chat_style))
    except DataError:
        raise
    except ValueError as err:  # the MT reader names file, record and field; keep its message
        raise DataError(str(err)) from None
    if not records:
        raise DataError(f"{raw.source}: the MT reader produced no preference records from {len(raw.records)} "
                        f"triplets ({stats})")
    converted = RawData(f"{raw.source} (converted)", records,
                        [f"converted record {i}" for i in range(1, len(records) + 1)], raw.limit)
    inner = normalise(converted, data_args)
    if inner.format not in ("standard", "conversational"):
        raise DataError(f"{raw.source}: the MT reader returned {inner.format} records; expected standard or "
                        "conversational")
    stats_text = _stats_text(stats)
    notes = [f"{len(raw.records)} triplets" + (f": {stats_text}" if stats_text else ""), *inner.notes]
    return FormattedData(raw.source, "mt_triplets", "text" if inner.format == "standard" else "messages",
                         inner.records, inner.locations, inner.identical, raw.limit, notes)


def _stats_text(stats: Any) -> str:
    """``{"pairs": {"de-en": 3}, "ties": 0, "skipped": {}}`` -> ``"pairs (de-en 3)"``: zeros and empties left out."""
    if not isinstance(stats, dict):
        return str(stats)
    parts = []
    for key, value in stats.items():
        if isinstance(value, dict):
            if value:
                parts.append(f"{key} (" + ", ".join(f"{k} {v}" for k, v in value.items()) + ")")
        elif value:
            parts.append(f"{key} {value}")
    return ", ".join(parts)
