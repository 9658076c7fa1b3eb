"""Sentence-level quality scorers for candidate translations (used by ``mt build-triplets``).

All scorers share one call: ``score(sources, candidates, references)`` where ``candidates[i]`` is
the list of candidate translations of segment ``i``; it returns ``scores[i][k]`` for
``candidates[i][k]`` (a float, higher is better, or ``None`` where a score is undefined).

* ``chrf``: sentence chrF2 (Popovic 2015; sacreBLEU's ``CHRF()``: character 6-grams, beta = 2)
  of each candidate against the reference, 0-100. The reference scored against itself is 100.
* ``bleu``: sentence BLEU (Papineni et al. 2002) with sacreBLEU's ``effective_order=True`` and
  exponential smoothing, tokenizer 13a (``zh`` / ``ja-mecab`` for Chinese / Japanese), 0-100.
* ``mbr-chrf``: reference-free consensus (minimum-Bayes-risk utility, Kumar & Byrne 2004; as used
  for MT quality ranking by Freitag et al. 2022): ``score(c_k) = mean_{j != k} chrF(c_k, c_j)``
  over the other non-empty candidates of the same segment. The caller includes the reference as
  one candidate when it should compete, as ALMA-R scores the reference too. Empty candidates get
  0 and are not used as pseudo-references; with fewer than two non-empty candidates every score
  is ``None``.
* ``comet`` / ``cometkiwi``: COMET (Rei et al. 2020) and reference-free CometKiwi (Rei et al.
  2022) through ``unbabel-comet`` (``pip install 'preftune[comet]'``) from a local checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF

SCORER_NAMES = ("chrf", "bleu", "mbr-chrf", "comet", "cometkiwi")


def bleu_tokenizer(tgt_lang: str) -> str:
    """sacreBLEU tokenizer for a target language: ``zh`` for Chinese, ``ja-mecab`` for Japanese
    when its extra dependencies are installed (otherwise ``13a``), ``13a`` for the rest."""
    if tgt_lang == "zh":
        return "zh"
    if tgt_lang == "ja":
        try:
            BLEU(tokenize="ja-mecab")
            return "ja-mecab"
        except (RuntimeError, ImportError):
            return "13a"
    return "13a"


class Scorer:
    """Base class: ``name`` (CLI name), ``needs_reference``, and :meth:`score`."""

    name = "base"
    needs_reference = True

    def score(self, sources: list[str], candidates: list[list[str]],
              references: list[str] | None) -> list[list[float | None]]:
        """Score ``candidates[i][k]`` for each segment ``i``; see the module docstring."""
        raise NotImplementedError

    def _check(self, sources, candidates, references) -> None:
        if len(candidates) != len(sources):
            raise ValueError(f"{self.name}: {len(sources)} sources but {len(candidates)} candidate lists")
        if self.needs_reference:
            if references is None:
                raise ValueError(f"scorer {self.name!r} needs references")
            if len(references) != len(sources):
                raise ValueError(f"{self.name}: {len(sources)} sources but {len(references)} references")


class ChrfScorer(Scorer):
    """Sentence chrF2 of each candidate against the reference (0-100)."""

    name = "chrf"

    def __init__(self) -> None:
        self.metric = CHRF()

    def score(self, sources, candidates, references):
        self._check(sources, candidates, references)
        return [[self.metric.sentence_score(c, [ref]).score for c in cands]
                for cands, ref in zip(candidates, references)]


class BleuScorer(Scorer):
    """Sentence BLEU (effective order, exp smoothing) against the reference (0-100)."""

    name = "bleu"

    def __init__(self, tgt_lang: str = "en") -> None:
        self.metric = BLEU(tokenize=bleu_tokenizer(tgt_lang), effective_order=True)

    def score(self, sources, candidates, references):
        self._check(sources, candidates, references)
        return [[self.metric.sentence_score(c, [ref]).score for c in cands]
                for cands, ref in zip(candidates, references)]


def mbr_chrf_scores(cands: list[str], metric: CHRF | None = None) -> list[float | None]:
    """Consensus chrF of each candidate: mean chrF2 against the other non-empty candidates.

    Returns:
        One score per candidate (0-100); empty candidates get 0.0; all ``None`` if fewer than two
        candidates are non-empty.
    """
    metric = metric or CHRF()
    live = [k for k, c in enumerate(cands) if c.strip()]
    if len(live) < 2:
        return [None] * len(cands)
    out: list[float | None] = [0.0] * len(cands)
    for k in live:
        others = [metric.sentence_score(cands[k], [cands[j]]).score for j in live if j != k]
        out[k] = sum(others) / len(others)
    return out


class MbrChrfScorer(Scorer):
    """Reference-free consensus chrF (see :func:`mbr_chrf_scores`)."""

    name = "mbr-chrf"
    needs_reference = False

    def __init__(self) -> None:
        self.metric = CHRF()

    def score(self, sources, candidates, references=None):
        self._check(sources, candidates, references)
        return [mbr_chrf_scores(cands, self.metric) for cands in candidates]


class CometScorer(Scorer):
    """COMET (with reference) or CometKiwi (reference-free) from a local checkpoint file.

    Raises:
        ValueError: no checkpoint given.
        FileNotFoundError: the checkpoint path does not exist.
        RuntimeError: ``unbabel-comet`` is not installed.
    """

    def __init__(self, checkpoint: str | None, reference_free: bool, batch_size: int = 16) -> None:
        self.name = "cometkiwi" if reference_free else "comet"
        self.needs_reference = not reference_free
        if not checkpoint:
            raise ValueError(f"scorer {self.name!r} needs a local checkpoint: --comet_checkpoint PATH "
                             "(e.g. .../checkpoints/model.ckpt of Unbabel/wmt22-comet-da or wmt22-cometkiwi-da)")
        if not Path(checkpoint).exists():
            raise FileNotFoundError(f"--comet_checkpoint {checkpoint}: no such file")
        try:
            import comet  # noqa: PLC0415
        except ImportError:
            raise RuntimeError(f"scorer {self.name!r} needs unbabel-comet: pip install 'preftune[comet]'") from None
        self.model = comet.load_from_checkpoint(checkpoint)
        self.batch_size = batch_size

    def score(self, sources, candidates, references):
        self._check(sources, candidates, references)
        import torch  # noqa: PLC0415

        data = []
        for i, cands in enumerate(candidates):
            for c in cands:
                item = {"src": sources[i], "mt": c}
                if self.needs_reference:
                    item["ref"] = references[i]
                data.append(item)
        gpus = 1 if torch.cuda.is_available() else 0
        flat = list(self.model.predict(data, batch_size=self.batch_size, gpus=gpus).scores)
        out, pos = [], 0
        for cands in candidates:
            out.append([float(s) for s in flat[pos:pos + len(cands)]])
            pos += len(cands)
        return out


def get_scorer(name: str, *, tgt_lang: str = "en", comet_checkpoint: str | None = None,
               batch_size: int = 16) -> Scorer:
    """Build a scorer by CLI name (one of :data:`SCORER_NAMES`).

    Raises:
        ValueError: unknown name, or a COMET scorer without checkpoint (see :class:`CometScorer`).
    """
    if name == "chrf":
        return ChrfScorer()
    if name == "bleu":
        return BleuScorer(tgt_lang)
    if name == "mbr-chrf":
        return MbrChrfScorer()
    if name in ("comet", "cometkiwi"):
        return CometScorer(comet_checkpoint, reference_free=name == "cometkiwi", batch_size=batch_size)
    raise ValueError(f"unknown scorer {name!r}; choose one of: {', '.join(SCORER_NAMES)}")
