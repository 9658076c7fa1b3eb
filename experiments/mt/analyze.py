"""Failure-mode counts for the MT experiment outputs (see docs/mt-cpo.md).

Usage: .venv/bin/python experiments/mt/analyze.py [--translations DIR] N SYSTEM...
(DIR default: experiments/out/mt/translations; the two-stage run: experiments/out/almar/translations)
Prints, per system: mean output length in words relative to the reference, the share of outputs
that echo a prompt label ("German:" / "English:"), that are mostly German (more German function
words than English ones), and that end in a loop (a 3-word sequence repeated 4+ times).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DE = {"der", "die", "das", "und", "ist", "nicht", "mit", "von", "den", "sie", "ein", "eine", "sich", "auf", "für"}
EN = {"the", "and", "is", "not", "with", "of", "to", "a", "in", "that", "it", "for", "on", "are", "was"}


def looped(words: list[str]) -> bool:
    grams = [" ".join(words[i:i + 3]) for i in range(len(words) - 2)]
    return any(grams.count(g) >= 4 for g in set(grams))


def main(n: int, systems: list[str], translations: Path = ROOT / "experiments/out/mt/translations") -> None:
    refs = [r["translation"]["en"] for r in json.loads(
        (ROOT / ".." / "shared" / "data" / "wmt" / "valid.de-en.json").read_text())][:n]
    ref_len = sum(len(r.split()) for r in refs)
    rows = {}
    for s in systems:
        hyps = (translations / s / "deen" / "test.de-en.en").read_text().splitlines()[:n]
        words = [h.split() for h in hyps]
        low = [[w.lower().strip(".,:;\"'") for w in ws] for ws in words]
        rows[s] = {
            "length_ratio": round(sum(map(len, words)) / ref_len, 3),
            "label_echo": round(sum(bool(re.match(r"^\W*(German|English):", h)) for h in hyps) / n, 3),
            "mostly_german": round(sum(sum(w in DE for w in ws) > sum(w in EN for w in ws) for ws in low) / n, 3),
            "loops": round(sum(looped(ws) for ws in low) / n, 3),
        }
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    args = sys.argv[1:]
    where = ROOT / "experiments/out/mt/translations"
    if args[:1] == ["--translations"]:
        where, args = Path(args[1]), args[2:]
    main(int(args[0]), args[1:], where)
