"""Parallel text -> prompt/completion JSONL for stage 1 of the ALMA-R recipe (LoRA SFT on human
translations; ALMA, Xu et al. 2023, arXiv 2309.11674, Sec. 3; ALMA-R, Xu et al. 2024).

Each line pair (source, target) of two line-aligned files becomes one record in TRL's SFT
prompt-completion format, with exactly the prompt and completion text the triplet path
(:func:`preftune.mt.triplets.triplets_to_preference_records`) gives a chosen translation:

* plain: ``{"prompt": make_prompt(src, tgt, source), "completion": completion_text(target, False)}``
  (the completion is ``" " + target``, see :mod:`preftune.mt.prompts`);
* ``--chat_style``: ``{"prompt": [user message], "completion": [assistant message]}``.

``preftune train --loss sft --dataset OUT.jsonl`` reads it (format ``prompt_completion``).
Both sides are stripped; pairs with an empty side are skipped and counted; ``--exclude FILE`` (ALMA JSON test sets or source
text files) drops pairs whose source sentence appears there, so evaluation sentences are never
trained on. ``--skip N`` / ``--limit N`` take lines ``N+1 ...`` / at most N records.

Usage::

    .venv/bin/python experiments/mt/make_sft_data.py --pair de-en \\
        --src ../shared/data/wmt/train.de-en.de --tgt ../shared/data/wmt/train.de-en.en \\
        --exclude ../shared/data/wmt/valid.de-en.json ../shared/data/wmt/test.de-en.json \\
        --output experiments/out/almar/sft.de-en.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from preftune.mt.prompts import chat_completion, chat_prompt, completion_text, make_prompt, parse_pair
from preftune.mt.readers import read_parallel_text, read_sources_and_references


def make_record(src: str, tgt: str, source: str, target: str, chat_style: bool = False) -> dict:
    """One prompt/completion record for ``source`` -> ``target`` (the triplet path's prompt and chosen text)."""
    prompt = make_prompt(src, tgt, source)
    if chat_style:
        return {"prompt": chat_prompt(prompt), "completion": chat_completion(target)}
    return {"prompt": prompt, "completion": completion_text(target, False)}


def excluded_sources(paths: list[str], src: str, tgt: str) -> set[str]:
    """Source sentences (stripped) of the ALMA JSON test sets or source text files in ``paths``."""
    out: set[str] = set()
    for path in paths:
        sources, _ = read_sources_and_references(path, src, tgt, require_ref=False)
        out.update(s.strip() for s in sources)
    return out


def build(pairs: list[tuple[str, str]], src: str, tgt: str, *, skip: int = 0, limit: Optional[int] = None,
          exclude: Optional[set[str]] = None, chat_style: bool = False) -> tuple[list[dict], Counter]:
    """Records from line pairs ``pairs[skip:]``, at most ``limit`` of them; returns ``(records, counts)``.

    ``counts``: ``lines`` (in the files), ``skipped_lines`` (``--skip``), ``empty`` (a blank side),
    ``excluded`` (source in ``exclude``), ``written``, ``not_read`` (lines left after ``limit`` was reached).
    """
    counts: Counter = Counter(lines=len(pairs), skipped_lines=min(skip, len(pairs)), empty=0, excluded=0)
    records: list[dict] = []
    index = min(skip, len(pairs))
    while index < len(pairs) and (limit is None or len(records) < limit):
        source, target = (text.strip() for text in pairs[index])
        index += 1
        if not source or not target:
            counts["empty"] += 1
        elif exclude and source in exclude:
            counts["excluded"] += 1
        else:
            records.append(make_record(src, tgt, source, target, chat_style))
    counts["written"] = len(records)
    counts["not_read"] = len(pairs) - index
    return records, counts


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: write the JSONL file, print the counts (one JSON line on stdout)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", required=True, help="Direction, e.g. de-en.")
    parser.add_argument("--src", required=True, help="Source-language text file, one sentence per line.")
    parser.add_argument("--tgt", required=True, help="Target-language text file, line-aligned with --src.")
    parser.add_argument("--output", required=True, help="JSONL file to write.")
    parser.add_argument("--skip", type=int, default=0, help="Leave out the first N line pairs.")
    parser.add_argument("--limit", type=int, default=None, help="Write at most N records.")
    parser.add_argument("--exclude", nargs="*", default=[],
                        help="ALMA JSON test sets / source text files whose source sentences are left out.")
    parser.add_argument("--chat_style", action="store_true", help="Message lists (chat template at training).")
    args = parser.parse_args(argv)
    if args.skip < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--skip must be >= 0 and --limit >= 1")
    try:
        src, tgt = parse_pair(args.pair)
        pairs = read_parallel_text(args.src, args.tgt)
        exclude = excluded_sources(args.exclude, src, tgt)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    records, counts = build(pairs, src, tgt, skip=args.skip, limit=args.limit, exclude=exclude,
                            chat_style=args.chat_style)
    if not records:
        print(f"error: no records written ({json.dumps(dict(counts))})", file=sys.stderr)
        return 1
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out)  # a complete file or none: run_almar.sh skips the step when the file exists
    print(json.dumps({"output": str(out), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
