"""Sentence scorers on hand-checked sentences."""

import math

import pytest

from preftune.mt.scorers import CometScorer, bleu_tokenizer, get_scorer, mbr_chrf_scores


def test_chrf_hand_checked():
    s = get_scorer("chrf")
    # "abc" vs "abd": char 1-grams P=R=2/3, 2-grams 1/2, 3-grams 0, no 4..6-grams (effective
    # order 3): mean P = mean R = 7/18, chrF2 = 7/18 (Popovic 2015, beta = 2); whitespace ignored.
    got = s.score(["x"], [["abc", "ab c", "xyz", "abd"]], ["abd"])[0]
    assert got[0] == pytest.approx(700 / 18) and got[1] == pytest.approx(700 / 18)
    assert got[2] == 0.0 and got[3] == 100.0


def test_sentence_bleu_hand_checked():
    s = get_scorer("bleu", tgt_lang="en")
    # 2 of 6 words, all matching: precisions 1 for orders 1-2 (effective order), BP = exp(1 - 6/2)
    got = s.score(["x"], [["the cat", "the cat sat on the mat"]], ["the cat sat on the mat"])[0]
    assert got[0] == pytest.approx(100 * math.exp(-2))
    assert got[1] == pytest.approx(100.0)
    assert bleu_tokenizer("zh") == "zh" and bleu_tokenizer("de") == "13a"
    with pytest.raises(ValueError, match="needs references"):
        s.score(["x"], [["a"]], None)


def test_mbr_chrf_consensus():
    # the candidate agreeing with both others wins; identical pair each get chrF 100 with each other
    cands = ["abd", "abd", "abc", ""]
    got = mbr_chrf_scores(cands)
    assert got[0] == pytest.approx((100 + 700 / 18) / 2)
    assert got[2] == pytest.approx(700 / 18)  # mean over the two "abd"
    assert got[3] == 0.0  # empty: scored 0, not a pseudo-reference
    assert mbr_chrf_scores(["only", "  "]) == [None, None]
    s = get_scorer("mbr-chrf")
    assert s.score(["x", "y"], [cands, ["a b", "a b"]], None)[1] == [100.0, 100.0]


def test_comet_errors(tmp_path):
    with pytest.raises(ValueError, match="--comet_checkpoint"):
        get_scorer("comet")
    with pytest.raises(FileNotFoundError):
        CometScorer(str(tmp_path / "missing.ckpt"), reference_free=True)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")
    try:
        import comet  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"preftune\[comet\]"):
            CometScorer(str(ckpt), reference_free=True)
    with pytest.raises(ValueError, match="unknown scorer"):
        get_scorer("meteor")
