"""Benchmark data: the same preference pairs, with the same truncation, for preftune and TRL.

Two sources (read-only, ``../shared/data`` relative to the repository root):

* ``hh``: Anthropic HH-RLHF ``harmless-base-dev.jsonl.gz`` (implicit-prompt dialogues), normalised
  by :func:`preftune.data.normalise` (prompt = shared turns up to the last ``"\\n\\nAssistant:"``).
* ``wmt``: WMT'22 German→English ALMA-R triplets built with :mod:`preftune.mt`: the reference and
  the six system outputs of ``wmt22-outputs-de-en`` are the candidates, scored with chrF against
  the reference (:class:`preftune.mt.scorers.ChrfScorer`); chosen = best, rejected = worst
  (:func:`preftune.mt.triplets.triplets_to_preference_records`).

* ``hh-long``: pairs that fill ``max_length`` (the length sweep): prompt = HH-RLHF prompts
  concatenated and cut to ``max_length / 2`` tokens, chosen and rejected = the chosen (rejected)
  responses of many records concatenated and cut to ``max_length / 4`` tokens each (decoded back
  to text), so ``[P C] = [P R] = 3/4 max_length`` and the shared-prompt unit ``[P C R] = max_length``.

Each record is tokenised and truncated by preftune (:func:`preftune.data.tokenize_records`,
``max_length`` / ``max_prompt_length``); the first ``n_pairs`` kept pairs are the benchmark set.
preftune reads the normalised records from a JSON-lines file (standard format) and re-tokenises
them itself; TRL receives ``prompt`` / ``chosen`` / ``rejected`` strings: the normalised strings
when preftune cut nothing, else the decoded truncated token ids, so that both tools train on the
same tokens (checked per pair by the worker, see ``bench_worker.token_check``).
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
HH_FILE = DATA_ROOT / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
WMT_DIR = DATA_ROOT / "wmt"


def _hh_records(limit: int, data_args) -> list[dict]:
    from preftune.data import load_raw, normalise

    return normalise(load_raw(f"{HH_FILE}#{limit}"), data_args).records


def _wmt_records(limit: int) -> tuple[list[dict], dict]:
    """ALMA-R de→en triplets from the first ``limit`` WMT'22 test sentences (chrF-scored)."""
    from preftune.mt.readers import read_lines, read_sources_and_references
    from preftune.mt.scorers import ChrfScorer
    from preftune.mt.triplets import REF, make_triplet_record, triplets_to_preference_records

    sources, refs = read_sources_and_references(WMT_DIR / "test.de-en.json", "de", "en")
    sources, refs = sources[:limit], refs[:limit]
    systems = sorted((WMT_DIR / "wmt22-outputs-de-en").glob("*.en"))
    outputs = {p.stem: read_lines(p)[:limit] for p in systems}
    names = list(outputs)
    candidates = [[refs[i]] + [outputs[n][i] for n in names] for i in range(len(sources))]
    scored = ChrfScorer().score(sources, candidates, refs)
    triplets = [make_triplet_record("de", "en", sources[i], refs[i], {n: outputs[n][i] for n in names},
                                    {"chrf": {REF: row[0], **dict(zip(names, row[1:]))}})
                for i, row in enumerate(scored)]
    return triplets_to_preference_records(triplets, source=str(WMT_DIR), language_pairs=["de-en"],
                                          cpo_scorer="chrf", chat_style=False)


def _long_records(n_pairs: int, max_length: int, data_args, tok) -> list[dict]:
    """``n_pairs`` records of ``max_length / 2`` prompt and ``max_length / 4`` + ``max_length / 4``
    completion tokens, cut from concatenated HH-RLHF texts (cycled when the file runs out)."""
    base = _hh_records(2000, data_args)
    streams = {}
    for key in ("prompt", "chosen", "rejected"):
        ids: list[int] = []
        need = n_pairs * max_length // (2 if key == "prompt" else 4) + 64
        i = 0
        while len(ids) < need:
            ids += tok(base[i % len(base)][key].strip() + "\n\n", add_special_tokens=False)["input_ids"]
            i += 1
        streams[key] = ids
    out = []
    for k in range(n_pairs):
        rec = {}
        # a few tokens left for "\n\nAssistant:" and the EOS, so that [P C R] is about max_length
        for key, n in (("prompt", max_length // 2 - 6), ("chosen", max_length // 4 - 2),
                       ("rejected", max_length // 4 - 2)):
            rec[key] = tok.decode(streams[key][k * n:(k + 1) * n])
        rec["prompt"] = rec["prompt"].rstrip() + "\n\nAssistant:"
        out.append(rec)
    return out


def prepare(dataset: str, n_pairs: int, out_dir: Path, *, max_length: int = 512,
            max_prompt_length: int = 256) -> dict:
    """Select the first ``n_pairs`` pairs preftune keeps and write them for both tools.

    Writes ``<out_dir>/<dataset>.jsonl`` (normalised records, read by preftune) and
    ``<out_dir>/<dataset>.pairs.json`` (TRL strings + preftune token ids per pair).
    Returns ``{"preftune_file", "pairs_file", "n_pairs", "prompt_tokens", ...}`` counts.
    Raises ``ValueError`` if the source yields fewer than ``n_pairs`` pairs.
    """
    from preftune.config import DataArguments, ModelArguments
    from preftune.data import tokenize_records
    from preftune.models import load_tokenizer

    tok = load_tokenizer(ModelArguments())
    data_args = DataArguments(max_length=max_length, max_prompt_length=max_prompt_length)
    extra: dict = {}
    if dataset == "hh":
        records = _hh_records(max(4 * n_pairs, 64), data_args)
    elif dataset == "hh-long":
        records = _long_records(n_pairs, max_length, data_args, tok)
    elif dataset == "wmt":
        records, stats = _wmt_records(max(2 * n_pairs, 32))
        extra["triplet_stats"] = {k: stats[k] for k in ("records", "pairs", "skipped", "chosen_by", "rejected_by")}
    else:
        raise ValueError(f"unknown benchmark dataset {dataset!r} (hh, hh-long or wmt)")
    chosen_records, pairs_out, cut = [], [], 0
    for rec in records:
        pairs, stats = tokenize_records([rec], tok, data_args)
        if not pairs:
            continue
        p = pairs[0]
        was_cut = bool(stats.prompts_truncated or stats.completions_truncated)
        cut += was_cut
        texts = ({k: rec[k] for k in ("prompt", "chosen", "rejected")} if not was_cut else
                 {"prompt": tok.decode(p.prompt_ids), "chosen": tok.decode(p.chosen_ids),
                  "rejected": tok.decode(p.rejected_ids)})
        chosen_records.append({k: rec[k] for k in ("prompt", "chosen", "rejected")})
        pairs_out.append({**texts, "prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                          "rejected_ids": p.rejected_ids, "truncated": was_cut})
        if len(pairs_out) == n_pairs:
            break
    if len(pairs_out) < n_pairs:
        raise ValueError(f"{dataset}: only {len(pairs_out)} usable pairs, {n_pairs} needed")
    out_dir.mkdir(parents=True, exist_ok=True)
    pt_file = out_dir / f"{dataset}.jsonl"
    pt_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen_records))
    pairs_file = out_dir / f"{dataset}.pairs.json"
    pairs_file.write_text(json.dumps(pairs_out, ensure_ascii=False))
    lp = [len(p["prompt_ids"]) for p in pairs_out]
    lc = [len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs_out]
    return {"preftune_file": str(pt_file), "pairs_file": str(pairs_file), "n_pairs": n_pairs,
            "pairs_truncated": cut, "mean_prompt_tokens": sum(lp) / len(lp),
            "mean_completion_tokens_both": sum(lc) / len(lc),
            "logical_tokens": sum(a * 2 + b for a, b in zip(lp, lc)), "unique_tokens": sum(lp) + sum(lc), **extra}
