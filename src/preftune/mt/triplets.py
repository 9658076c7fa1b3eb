"""ALMA-R preference triplets: pick chosen / rejected translations and build records.

Record layout (one JSON object per source sentence; ``haoranxu/ALMA-R-Preference``)::

    {"translation": {
        "language_pair": "de-en",            # the record's direction; both directions can be used
        "de": "<German text>", "en": "<English text>",        # the two reference sides
        "gpt4_en": "...", "alma_en": "...",                   # system outputs into English
        "gpt4_en_kiwi": 0.83, "alma_en_kiwi": 0.80, "ref_en_kiwi": 0.85,   # {system}_{lang}_{scorer}
        ... the same for the German side (gpt4_de, ref_de_kiwi, ...),
        "Delta": 0.0,                        # optional human preference gpt4 vs alma
        "required_directions": ""}}          # optional, e.g. "en-de": only that direction

preftune extension (written by ``preftune mt build-triplets``): ``"candidates": [names]`` lists
extra systems whose outputs are stored under the same generic keys ``{name}_{lang}`` and
``{name}_{lang}_{scorer}``; ``"scorers": [suffixes]`` lists the score suffixes present. A score of
``null`` means "not a candidate" (e.g. the reference with ``--exclude_reference``).

Selection (ALMA-R, Xu et al. 2024, arXiv 2401.08417, Sec. 3.2 "Preference Data"; ALMA's
``get_chosen_reject``): the candidates are the reference and every system output; chosen = the
highest-scored, rejected = the lowest-scored (first one in candidate order on equal scores:
reference, gpt4, alma, then ``candidates``). If the record has a non-zero human ``Delta``, it
decides instead: ``Delta > 0`` -> gpt4 chosen over alma, ``Delta < 0`` -> alma over gpt4. A
non-empty ``required_directions`` (``"en-de"``) keeps only the direction into its target language.
"""

from __future__ import annotations

import math
from collections import Counter

from preftune.mt.prompts import (
    chat_completion,
    chat_prompt,
    completion_text,
    make_prompt,
    parse_language_pairs,
    parse_pair,
)

ALMA_SYSTEMS = ("gpt4", "alma")
REF = "ref"
_RESERVED = {"language_pair", "candidates", "scorers", "Delta", "required_directions", REF}


def scorer_suffix(name: str) -> str:
    """Score-field suffix of a scorer name: ``"mbr-chrf"`` -> ``"mbr_chrf"``."""
    return name.strip().replace("-", "_")


def _where(source: str, index: int, field: str | None = None) -> str:
    return f"{source}: record {index}" + (f": field 'translation.{field}'" if field else "")


def _text_key(name: str, lang: str) -> str:
    return lang if name == REF else f"{name}_{lang}"


def candidate_names(tr: dict, tgt: str) -> list[str]:
    """Candidate systems into ``tgt`` in selection order: ``ref``, the ALMA-R slots ``gpt4`` and
    ``alma`` when present, then the names in ``candidates``."""
    extra = tr.get("candidates") or []
    names = [REF] + [s for s in ALMA_SYSTEMS if f"{s}_{tgt}" in tr and s not in extra]
    return names + [n for n in extra if n not in names]


def _available_scorers(tr: dict, tgt: str) -> list[str]:
    prefix = f"{REF}_{tgt}_"
    return sorted(k[len(prefix):] for k in tr if k.startswith(prefix))


def _resolve_scorer(tr: dict, tgt: str, cpo_scorer: str | None, where: str) -> str:
    if cpo_scorer:
        return scorer_suffix(cpo_scorer)
    declared = tr.get("scorers") or []
    if len(declared) == 1:
        return scorer_suffix(declared[0])
    found = declared or _available_scorers(tr, tgt)
    raise ValueError(f"{where}: choose a score field with cpo_scorer (--cpo_scorer); this record has: "
                     f"{', '.join(found) or 'none'}")


def _number(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number or null, got {value!r}")
    if math.isnan(value):
        return None
    return float(value)


def select_pair(tr: dict, src: str, tgt: str, cpo_scorer: str | None, stats: Counter,
                source: str = "<records>", index: int = 0) -> tuple[str, str, str, str] | str:
    """Pick (chosen, rejected) for direction ``src`` -> ``tgt`` of one record.

    Returns:
        ``(chosen_text, rejected_text, chosen_system, rejected_system)``, or a string: the reason
        the direction is skipped. ``stats`` counters are updated (``empty_candidates``,
        ``unscored_candidates``, ``tied_best``, ``delta_used``).

    Raises:
        ValueError: a missing / non-string text field or a missing / non-numeric score field;
            the message names source, record index and field.
    """
    names = candidate_names(tr, tgt)
    if not any(_text_key(n, tgt) in tr for n in names if n != REF):
        return f"no candidate translations into '{tgt}'"
    delta = tr.get("Delta")
    delta = _number(delta, _where(source, index, "Delta"))
    if delta:
        texts = []
        for name in ALMA_SYSTEMS:
            key = _text_key(name, tgt)
            if not isinstance(tr.get(key), str):
                raise ValueError(f"{_where(source, index, key)} is needed by the non-zero 'Delta' but is "
                                 "missing or not a string")
            texts.append(tr[key])
        stats["delta_used"] += 1
        return (texts[0], texts[1], "gpt4", "alma") if delta > 0 else (texts[1], texts[0], "alma", "gpt4")

    suffix = _resolve_scorer(tr, tgt, cpo_scorer, _where(source, index))
    scored: list[tuple[str, str, float]] = []
    for name in names:
        key, skey = _text_key(name, tgt), f"{name}_{tgt}_{suffix}"
        text = tr.get(key)
        if not isinstance(text, str):
            raise ValueError(f"{_where(source, index, key)} is missing or not a string")
        if skey not in tr:
            avail = _available_scorers(tr, tgt)
            raise ValueError(f"{_where(source, index, skey)} is missing (score fields present for: "
                             f"{', '.join(avail) or 'none'})")
        score = _number(tr[skey], _where(source, index, skey))
        if score is None:
            stats["unscored_candidates"] += 1
        elif not text.strip():
            stats["empty_candidates"] += 1
        else:
            scored.append((name, text, score))
    if len(scored) < 2:
        return "fewer than 2 scored non-empty candidates"
    scores = [s for _, _, s in scored]
    best, worst = scores.index(max(scores)), scores.index(min(scores))
    if scores[best] == scores[worst]:
        return "tie: all candidates have the same score"
    if scores.count(scores[best]) > 1:
        stats["tied_best"] += 1
    if scored[best][1].strip() == scored[worst][1].strip():
        return "identical chosen and rejected text"
    return scored[best][1], scored[worst][1], scored[best][0], scored[worst][0]


def _directions(tr: dict, pairs: list[tuple[str, str]] | None, where: str) -> list[tuple[str, str]]:
    lp = tr.get("language_pair")
    if not isinstance(lp, str):
        raise ValueError(f"{where}: field 'translation.language_pair' is missing or not a string")
    try:
        src, tgt = parse_pair(lp)
    except ValueError as err:
        raise ValueError(f"{where}: field 'translation.language_pair': {err}") from None
    both = [(src, tgt), (tgt, src)]
    if pairs is None:
        return both
    return [p for p in pairs if p in both]


def triplets_to_preference_records(
    raw_records: list[dict], *, source: str, language_pairs: list[str] | str | None,
    cpo_scorer: str | None, chat_style: bool,
) -> tuple[list[dict], dict]:
    """Turn ALMA-R triplet records into preference pairs, one per record and listed direction.

    Args:
        raw_records: ``[{"translation": {...}}]`` (see the module docstring for the fields).
        source: file name used in error messages.
        language_pairs: directions to build, e.g. ``["de-en", "en-de"]`` or ``"de-en,en-de"``; a
            record whose ``language_pair`` is ``de-en`` serves both. ``None``: both directions of
            every record, each where the record holds outputs into its target language.
        cpo_scorer: score-field suffix (``kiwi_xcomet``, ``mbr-chrf``...). ``None`` works only
            when the record declares exactly one scorer in ``scorers``.
        chat_style: prompt as ``[{"role": "user", ...}]`` and completions as
            ``[{"role": "assistant", ...}]``; otherwise strings, the completion with a leading
            space (see :mod:`preftune.mt.prompts`).

    Returns:
        ``(records, stats)``: records with ``prompt``, ``chosen``, ``rejected``; stats with
        ``records`` (input count), ``pairs`` (per direction), ``skipped`` (reason -> count),
        ``ties``, ``tied_best``, ``identical_chosen_rejected``, ``empty_candidates``,
        ``unscored_candidates``, ``delta_used``, ``chosen_by`` / ``rejected_by`` (system -> count).

    Raises:
        ValueError: malformed record; names ``source``, the record index and the field.
    """
    pairs = parse_language_pairs(language_pairs)
    counters: Counter = Counter()
    per_dir: Counter = Counter()
    skipped: Counter = Counter()
    chosen_by: Counter = Counter()
    rejected_by: Counter = Counter()
    out: list[dict] = []
    for i, rec in enumerate(raw_records):
        tr = rec.get("translation") if isinstance(rec, dict) else None
        if not isinstance(tr, dict):
            raise ValueError(f"{_where(source, i)}: field 'translation' is missing or not an object")
        dirs = _directions(tr, pairs, _where(source, i))
        if not dirs:
            skipped["language pair not requested"] += 1
        for src, tgt in dirs:
            rd = tr.get("required_directions")
            if isinstance(rd, str) and rd.strip() and rd.strip().split("-")[-1] != tgt:
                skipped[f"required_directions excludes {src}-{tgt}"] += 1
                continue
            if not isinstance(tr.get(src), str):
                raise ValueError(f"{_where(source, i, src)} (source text) is missing or not a string")
            result = select_pair(tr, src, tgt, cpo_scorer, counters, source, i)
            if isinstance(result, str):
                skipped[result] += 1
                continue
            chosen, rejected, c_sys, r_sys = result
            prompt = make_prompt(src, tgt, tr[src])
            if chat_style:
                out.append({"prompt": chat_prompt(prompt), "chosen": chat_completion(chosen),
                            "rejected": chat_completion(rejected)})
            else:
                out.append({"prompt": prompt, "chosen": completion_text(chosen, False),
                            "rejected": completion_text(rejected, False)})
            per_dir[f"{src}-{tgt}"] += 1
            chosen_by[c_sys] += 1
            rejected_by[r_sys] += 1
    stats = {
        "records": len(raw_records),
        "pairs": dict(per_dir),
        "skipped": dict(skipped),
        "ties": skipped.get("tie: all candidates have the same score", 0),
        "identical_chosen_rejected": skipped.get("identical chosen and rejected text", 0),
        "tied_best": counters["tied_best"],
        "empty_candidates": counters["empty_candidates"],
        "unscored_candidates": counters["unscored_candidates"],
        "delta_used": counters["delta_used"],
        "chosen_by": dict(chosen_by),
        "rejected_by": dict(rejected_by),
    }
    return out, stats


def make_triplet_record(src: str, tgt: str, source_text: str, reference: str, outputs: dict[str, str],
                        scores: dict[str, dict[str, float | None]]) -> dict:
    """Build one ALMA-R-format record (preftune extension: ``candidates`` and ``scorers``).

    Args:
        outputs: system name -> translation into ``tgt`` (a name must not be ``ref``, one of the
            two language codes, a reserved key, or contain whitespace).
        scores: scorer suffix -> {candidate name or ``"ref"`` -> score or ``None``}.

    Raises:
        ValueError: a reserved or clashing system name, or a score for an unknown candidate.
    """
    for name in outputs:
        if name in _RESERVED or name in (src, tgt) or not name or any(c.isspace() for c in name):
            raise ValueError(f"system name {name!r} is reserved or invalid in the triplet format")
    tr: dict = {"language_pair": f"{src}-{tgt}", src: source_text, tgt: reference,
                "candidates": list(outputs), "scorers": list(scores)}
    for name, text in outputs.items():
        tr[f"{name}_{tgt}"] = text
    for suffix, per_name in scores.items():
        for name, value in per_name.items():
            if name != REF and name not in outputs:
                raise ValueError(f"score {suffix!r} given for unknown candidate {name!r}")
            tr[f"{name}_{tgt}_{suffix}"] = value
    return {"translation": tr}
