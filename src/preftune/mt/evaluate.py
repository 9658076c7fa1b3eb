"""Corpus-level evaluation: sacreBLEU BLEU and chrF (Post 2018, "A Call for Clarity in Reporting
BLEU Scores"), optionally COMET, for several systems x language pairs.

Segments are read as sacreBLEU's command line reads them (one per line, trailing whitespace
removed), so the numbers equal ``sacrebleu REF -i HYP -m bleu chrf`` exactly. BLEU uses the 13a
tokenizer, ``zh`` for Chinese targets and ``ja-mecab`` for Japanese when installed
(:func:`preftune.mt.scorers.bleu_tokenizer`); chrF is sacreBLEU's default chrF2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF

from preftune.mt.prompts import parse_pair
from preftune.mt.readers import read_lines, read_sources_and_references
from preftune.mt.scorers import bleu_tokenizer


def corpus_scores(hyps: list[str], refs: list[str], tgt_lang: str) -> dict:
    """Corpus BLEU and chrF of ``hyps`` against one reference per segment.

    Returns:
        ``{"bleu": float, "chrf": float, "segments": int, "signature": {"bleu": str, "chrf": str}}``
        (scores 0-100, full precision; signatures as sacreBLEU prints them).

    Raises:
        ValueError: different numbers of hypotheses and references.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    bleu = BLEU(tokenize=bleu_tokenizer(tgt_lang))
    chrf = CHRF()
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    return {"bleu": b.score, "chrf": c.score, "segments": len(hyps),
            "signature": {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}}


def system_name(path: str | Path, src: str, tgt: str) -> str:
    """Name of a system from its output file: the file stem, or for ALMA's layout
    ``OUT/<model>/<src><tgt>/test.<src>-<tgt>.<tgt>`` the ``<model>`` directory."""
    path = Path(path)
    if re.fullmatch(rf"[^.]+\.{src}-{tgt}\.{tgt}", path.name) and path.parent.name == f"{src}{tgt}":
        return path.parent.parent.name
    return path.stem


def load_references(path: str | Path, src: str, tgt: str) -> list[str]:
    """References from ALMA JSON (``translation.<tgt>``) or a text file, trailing whitespace
    removed (newlines inside a JSON reference would shift lines in sacreBLEU's CLI: error)."""
    path = Path(path)
    if path.suffix in (".json", ".jsonl"):
        _, refs = read_sources_and_references(path, src, tgt)
        for i, r in enumerate(refs):
            if "\n" in r:
                raise ValueError(f"{path}: record {i}: field 'translation.{tgt}' contains a newline")
        return [r.rstrip() for r in refs]
    return read_lines(path)


def _count_mismatch(hyp_file, hyps: list[str], ref_file, refs: list[str], limit: int | None) -> str:
    """One line for a hypothesis file whose segment count differs from the references': the file, the
    first line without a partner (a missing hypothesis, or one more than there are references)."""
    counts = (f"{hyp_file} has {len(hyps)} lines, references {ref_file} have {len(refs)}"
              + (f" (after --limit {limit})" if limit else "") + "; one hypothesis per reference line")
    if len(hyps) < len(refs):
        return f"{hyp_file}: line {len(hyps) + 1}: missing: {counts}"
    return f"{hyp_file}: line {len(refs) + 1}: one more than the references: {counts}"


def evaluate_systems(groups: list[tuple[str, str, list[str]]], comet=None,
                     limit: int | None = None) -> dict[str, dict[str, dict]]:
    """Score every hypothesis file of every (pair, reference file) group.

    Args:
        groups: ``[(pair, ref_file, [hyp_file, ...]), ...]``.
        comet: optional :class:`preftune.mt.scorers.CometScorer`; adds ``comet`` (mean score).
        limit: score only the first N segments (references are cut to match).

    Returns:
        ``{pair: {system: scores}}`` with scores as in :func:`corpus_scores` plus ``file``.

    Raises:
        ValueError: a hypothesis file whose line count differs from the references (names both
            files), or two files with the same system name in one pair.
    """
    results: dict[str, dict[str, dict]] = {}
    for pair, ref_file, hyp_files in groups:
        src, tgt = parse_pair(pair)
        refs = load_references(ref_file, src, tgt)
        sources = None
        if limit is not None:
            refs = refs[:limit]
        table = results.setdefault(pair, {})
        for hf in hyp_files:
            hyps = read_lines(hf)
            if limit is not None:
                hyps = hyps[:limit]
            if len(hyps) != len(refs):
                raise ValueError(_count_mismatch(hf, hyps, ref_file, refs, limit))
            name = system_name(hf, src, tgt)
            if name in table:
                raise ValueError(f"two outputs named {name!r} for {pair}: {table[name]['file']} and {hf}")
            scores = corpus_scores(hyps, refs, tgt)
            scores["file"] = str(hf)
            if comet is not None:
                if sources is None:
                    sources, _ = read_sources_and_references(ref_file, src, tgt, require_ref=False)
                    sources = sources[:len(refs)]
                seg = comet.score(sources, [[h] for h in hyps], refs)
                scores["comet"] = sum(s[0] for s in seg) / len(seg)
            table[name] = scores
    return results


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown table: one row per system and pair with BLEU, chrF (2 decimals) and the BLEU
    signature."""
    has_comet = any("comet" in s for t in results.values() for s in t.values())
    head = "| system | pair | BLEU | chrF |" + (" COMET |" if has_comet else "") + " segments |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for pair, table in results.items():
        for name, s in table.items():
            comet = f" {s['comet']:.4f} |" if has_comet else ""
            lines.append(f"| {name} | {pair} | {s['bleu']:.2f} | {s['chrf']:.2f} |{comet} {s['segments']} |")
    sigs = sorted({s["signature"]["bleu"] for t in results.values() for s in t.values()})
    sigs += sorted({s["signature"]["chrf"] for t in results.values() for s in t.values()})
    return "\n".join(lines) + "\n\n" + "\n".join(f"sacreBLEU signature: `{sig}`" for sig in sigs) + "\n"


def results_json(results: dict[str, dict[str, dict]]) -> dict:
    """JSON layout: ``{system: scores}`` for one pair (as ``--json`` promises), else
    ``{pair: {system: scores}}``."""
    if len(results) == 1:
        return next(iter(results.values()))
    return results


def write_json(results: dict[str, dict[str, dict]], path: str | Path) -> None:
    """Write :func:`results_json` to ``path`` (directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results_json(results), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
