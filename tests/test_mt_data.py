"""MT prompts, readers and ALMA-R triplet selection on small inline samples."""

import json

import pytest

from preftune.mt.prompts import (
    clean_translation,
    make_prompt,
    parse_language_pairs,
)
from preftune.mt.readers import (
    read_parallel_json,
    read_parallel_text,
    read_triplet_file,
    triplets_to_preference_records,
)
from preftune.mt.triplets import make_triplet_record


def alma_record(**over):
    """One ALMA-R-Preference-style record (both directions, kiwi and xcomet scores)."""
    tr = {
        "language_pair": "de-en", "de": "Hallo Welt.", "en": "Hello world.",
        "gpt4_en": "Hello, world.", "alma_en": "Hi world.",
        "gpt4_de": "Hallo, Welt.", "alma_de": "Servus Welt.",
        "ref_en_kiwi": 0.80, "gpt4_en_kiwi": 0.90, "alma_en_kiwi": 0.70,
        "ref_de_kiwi": 0.95, "gpt4_de_kiwi": 0.60, "alma_de_kiwi": 0.85,
        "ref_en_xcomet": 0.50, "gpt4_en_xcomet": 0.60, "alma_en_xcomet": 0.99,
        "ref_de_xcomet": 0.9, "gpt4_de_xcomet": 0.9, "alma_de_xcomet": 0.9,
        "Delta": 0.0, "required_directions": "",
    }
    tr.update(over)
    return {"translation": tr}


def test_prompt_and_pairs():
    assert make_prompt("de", "en", "Hallo.") == "Translate this from German to English:\nGerman: Hallo.\nEnglish:"
    assert make_prompt("en", "zh", "Hi.").endswith("\nChinese:")
    assert parse_language_pairs("de-en, en-de,de-en") == [("de", "en"), ("en", "de")]
    assert parse_language_pairs(None) is None
    for bad in ("de", "de-de", "de-xx"):
        with pytest.raises(ValueError):
            parse_language_pairs(bad)
    assert clean_translation(" \n Hello there.\nEnglish: more") == "Hello there."


def test_read_parallel_json_and_text(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"translation": {"de": "a", "en": "b"}}, {"translation": {"de": "c"}}]))
    assert read_parallel_json(p)[0] == {"de": "a", "en": "b"}
    with pytest.raises(ValueError, match=r"x\.json: record 1: field 'translation\.en'"):
        read_parallel_json(p, ("de", "en"))
    s, t = tmp_path / "train.de-en.de", tmp_path / "train.de-en.en"
    s.write_text("eins\nzwei\n")
    t.write_text("one\ntwo\n")
    assert read_parallel_text(s, t) == [("eins", "one"), ("zwei", "two")]
    t.write_text("one\n")
    with pytest.raises(ValueError, match=r"train\.de-en\.de has 2 lines.*train\.de-en\.en has 1 lines"):
        read_parallel_text(s, t)
    jl = tmp_path / "t.jsonl"
    jl.write_text(json.dumps(alma_record()) + "\n\n" + json.dumps(alma_record()) + "\n")
    assert len(read_triplet_file(jl)) == 2


def test_highest_and_lowest_both_directions_plain():
    recs, stats = triplets_to_preference_records([alma_record()], source="f.json", language_pairs=["de-en", "en-de"],
                                                 cpo_scorer="kiwi", chat_style=False)
    assert stats["pairs"] == {"de-en": 1, "en-de": 1}
    de_en, en_de = recs
    assert de_en["prompt"] == make_prompt("de", "en", "Hallo Welt.")
    assert (de_en["chosen"], de_en["rejected"]) == (" Hello, world.", " Hi world.")  # gpt4 0.9 > ref > alma 0.7
    assert en_de["prompt"] == make_prompt("en", "de", "Hello world.")
    assert (en_de["chosen"], en_de["rejected"]) == (" Hallo Welt.", " Hallo, Welt.")  # ref 0.95 best, gpt4 worst
    assert stats["chosen_by"] == {"gpt4": 1, "ref": 1}


def test_scorer_choice_and_chat_style():
    recs, _ = triplets_to_preference_records([alma_record()], source="f", language_pairs="de-en",
                                             cpo_scorer="xcomet", chat_style=True)
    assert recs == [{"prompt": [{"role": "user", "content": make_prompt("de", "en", "Hallo Welt.")}],
                     "chosen": [{"role": "assistant", "content": "Hi world."}],
                     "rejected": [{"role": "assistant", "content": "Hello world."}]}]


def test_delta_overrides_scores_and_required_directions():
    pos = alma_record(Delta=1.5, required_directions="en-de")
    neg = alma_record(Delta=-0.5)
    recs, stats = triplets_to_preference_records([pos, neg], source="f", language_pairs=["de-en", "en-de"],
                                                 cpo_scorer="kiwi", chat_style=False)
    # pos: only en-de survives; Delta>0 -> gpt4 chosen although kiwi ranks it last
    assert stats["skipped"] == {"required_directions excludes de-en": 1}
    assert (recs[0]["chosen"], recs[0]["rejected"]) == (" Hallo, Welt.", " Servus Welt.")
    # neg: both directions, alma chosen
    assert [(r["chosen"], r["rejected"]) for r in recs[1:]] == [(" Hi world.", " Hello, world."),
                                                              (" Servus Welt.", " Hallo, Welt.")]
    assert stats["delta_used"] == 3


def test_ties_empty_identical_and_errors():
    tie = alma_record(ref_en_kiwi=0.5, gpt4_en_kiwi=0.5, alma_en_kiwi=0.5)
    empty = alma_record(alma_en="  ")
    same = alma_record(alma_en="Hello, world.", alma_en_kiwi=0.1)
    recs, stats = triplets_to_preference_records([tie, empty, same], source="f", language_pairs=["de-en"],
                                                 cpo_scorer="kiwi", chat_style=False)
    assert stats["ties"] == 1 and stats["empty_candidates"] == 1 and stats["identical_chosen_rejected"] == 1
    assert (recs[0]["chosen"], recs[0]["rejected"]) == (" Hello, world.", " Hello world.")  # alma dropped
    assert len(recs) == 1
    with pytest.raises(ValueError, match=r"data\.json: record 0: field 'translation\.ref_en_comet' is missing"):
        triplets_to_preference_records([alma_record()], source="data.json", language_pairs=None,
                                       cpo_scorer="comet", chat_style=False)
    with pytest.raises(ValueError, match=r"record 0: choose a score field.*kiwi, xcomet"):
        triplets_to_preference_records([alma_record()], source="d", language_pairs=None, cpo_scorer=None,
                                       chat_style=False)
    with pytest.raises(ValueError, match=r"record 0: field 'translation\.gpt4_en_kiwi' must be a number"):
        triplets_to_preference_records([alma_record(gpt4_en_kiwi="high")], source="d", language_pairs=None,
                                       cpo_scorer="kiwi", chat_style=False)


def test_generic_candidates_round_trip(tmp_path):
    rec = make_triplet_record("de", "en", "Hallo.", "Hello.", {"sysA": "Hi.", "sysB": "Hello there."},
                              {"chrf": {"ref": None, "sysA": 10.0, "sysB": 60.0}})
    assert rec["translation"]["sysB_en_chrf"] == 60.0 and rec["translation"]["candidates"] == ["sysA", "sysB"]
    recs, stats = triplets_to_preference_records([rec], source="f", language_pairs=None, cpo_scorer=None,
                                                 chat_style=False)
    # scorer taken from "scorers"; null reference score = reference is not a candidate; no en-de outputs
    assert (recs[0]["chosen"], recs[0]["rejected"]) == (" Hello there.", " Hi.")
    assert stats["unscored_candidates"] == 1
    assert stats["skipped"] == {"no candidate translations into 'de'": 1}
    with pytest.raises(ValueError, match="reserved"):
        make_triplet_record("de", "en", "a", "b", {"ref": "x"}, {})
