"""Data pipeline: loading, formats, validation errors, truncation, split (toy char-level tokenizer)."""

from __future__ import annotations

import gzip
import json
import logging
import string
import sys
import types

import pytest
from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast

from preftune.config import DataArguments
from preftune.data import (
    DataError,
    build_datasets,
    load_raw,
    normalise,
    parse_spec,
    split_indices,
    tokenize_records,
    truncate_pair,
)

MARK = "\n\nAssistant:"


@pytest.fixture(scope="module")
def char_tok():
    """One token per printable character; adds <s> (BOS) in front with special tokens; EOS </s>."""
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def pair(i=0, **extra):
    return {"prompt": f"Q{i}:", "chosen": f" good {i}", "rejected": f" bad {i}", **extra}


def args(**kw):
    kw.setdefault("max_length", None)
    kw.setdefault("max_prompt_length", None)
    return DataArguments(**kw)


# ---------------------------------------------------------------- loading


def test_spec_and_first_n(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pair(i) for i in range(10)])
    assert parse_spec("a/b.jsonl#12") == ("a/b.jsonl", 12)
    raw = load_raw(path + "#3")
    assert [r["prompt"] for r in raw.records] == ["Q0:", "Q1:", "Q2:"]
    assert raw.locations == ["line 1", "line 2", "line 3"]
    longer = load_raw(path + "#50")
    assert len(longer.records) == 10 and "file is shorter" in longer.describe()
    for bad in ("#0", "#x", "#-2"):
        with pytest.raises(DataError, match="positive number of records"):
            load_raw(path + bad)


def test_jsonl_gz_blank_lines_and_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(pair(0)) + "\n\n" + json.dumps(pair(1)) + "\n")
    raw = load_raw(str(path))
    assert raw.locations == ["line 1", "line 3"]


def test_unparsable_and_non_object_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(pair(0)) + "\n" + json.dumps(pair(1)) + "\n{\"prompt\": \"x\",\n")
    with pytest.raises(DataError, match=rf"^{path}, line 3: not valid JSON"):
        load_raw(str(path))
    path.write_text(json.dumps(pair(0)) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=rf"^{path}, line 2: expected a JSON object, got list"):
        load_raw(str(path))


def test_json_parquet_csv(tmp_path):
    import datasets

    records = [pair(i) for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(records).to_csv(str(tmp_path / "d.csv"), index=False)
    for name in ("d.json", "d.parquet", "d.csv"):
        raw = load_raw(str(tmp_path / name) + "#3")
        assert raw.records == records[:3], name
        assert raw.locations[-1] == "record 3"
    (tmp_path / "broken.json").write_text('[{"prompt": "a",\n "chosen": }]')
    with pytest.raises(DataError, match=r"broken.json, line 2: not valid JSON"):
        load_raw(str(tmp_path / "broken.json"))


def test_missing_file_unsupported_type_and_hub(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_raw(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_raw(str(tmp_path / "d.txt"))
    import datasets

    calls = []

    def offline(name, split):
        calls.append((name, split))
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"^someone/prefs:train_prefs: not a local file, .*ConnectionError: no network"):
        load_raw("someone/prefs:train_prefs#5")
    assert calls == [("someone/prefs", "train_prefs[:5]")]


def test_demo_set_ships_and_is_standard():
    raw = load_raw(None)
    assert raw.source.endswith("resources/demo.jsonl")
    assert 48 <= len(raw.records) <= 64
    data = normalise(raw, DataArguments())
    assert data.format == "standard" and data.identical == 0
    assert all(r["prompt"].endswith("Answer:") and r["chosen"].startswith(" ") for r in data.records)


# ---------------------------------------------------------------- formats and validation


@pytest.mark.parametrize("record, field, problem", [
    ({"prompt": "p", "chosen": "c"}, "rejected", "missing"),
    ({"prompt": "p", "chosen": 5, "rejected": "r"}, "chosen", "expected a string"),
    ({"prompt": "  ", "chosen": "c", "rejected": "r"}, "prompt", "empty"),
    ({"prompt": ["p"], "chosen": "c", "rejected": "r"}, "prompt", r"expected a string \(standard format, detected from line 1\)"),
])
def test_standard_errors_name_file_line_field(tmp_path, record, field, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [pair(0), pair(1), record])
    with pytest.raises(DataError, match=rf"^{path}, line 3, field '{field}': {problem}"):
        normalise(load_raw(path), args())


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("record, field, problem", [
    ({"prompt": [{"role": "robot", "content": "hi"}], "chosen": [bot("a")], "rejected": [bot("b")]},
     r"prompt\[0\].role", "'robot' is not a valid role"),
    ({"prompt": [user("hi")], "chosen": [{"role": "assistant"}], "rejected": [bot("b")]},
     r"chosen\[0\].content", "missing"),
    ({"prompt": [user("hi")], "chosen": [bot("a")], "rejected": [user("b")]},
     r"rejected\[0\].role", "'user': completions must be assistant messages"),
    ({"prompt": [user("hi")], "chosen": [bot("a")], "rejected": []}, "rejected", "empty message list"),
    ({"prompt": [user("hi"), bot("x")], "chosen": [bot("a")], "rejected": [bot("b")]}, "prompt",
     "ends with an assistant message"),
])
def test_conversational_errors(tmp_path, record, field, problem):
    good = {"prompt": [user("hi")], "chosen": [bot("a")], "rejected": [bot("b")]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([good, record]))
    with pytest.raises(DataError, match=rf"^{path}, record 2, field '{field}': {problem}"):
        normalise(load_raw(str(path)), args())


def test_identical_pairs_are_counted_not_rejected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pair(0), {"prompt": "p", "chosen": " same", "rejected": " same"}])
    data = normalise(load_raw(path), args())
    assert data.identical == 1 and "1 with chosen == rejected" in data.describe()


def test_undetectable_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=rf"^{path}, line 1: cannot detect the data format"):
        normalise(load_raw(path), args())


def test_implicit_text_prompt_ends_at_turn_boundary(tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a fact." + MARK
    records = [
        {"chosen": shared + " Sure, the Nile is long.", "rejected": shared + " Sure, go away."},  # shared "Sure, "
        {"chosen": shared + " A", "rejected": shared + " B"},
        {"chosen": shared + " ", "rejected": shared + " B"},  # empty final reply: kept and counted
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", records)
    data = normalise(load_raw(path), args())
    assert data.format == "implicit_prompt" and data.kind == "text"
    assert all(r["prompt"] == shared for r in data.records)
    assert data.records[0]["chosen"] == " Sure, the Nile is long."
    assert data.records[0]["rejected"] == " Sure, go away."
    assert "1 pairs with an empty final reply" in data.describe()


def test_implicit_text_without_shared_marker(tmp_path):
    """Without a shared Assistant turn the prompt is TRL's longest common prefix; no shared text at all
    is an error naming the record."""
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "Human: x\n\nAssistant: a", "rejected": "Human: y"}])
    assert normalise(load_raw(path), args()).records[0] == {"prompt": "Human:", "chosen": " x\n\nAssistant: a",
                                                            "rejected": " y"}
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "Human: x\n\nAssistant: a", "rejected": "Other: b"}])
    with pytest.raises(DataError, match=rf"^{path}, line 1, field 'chosen': chosen and rejected share no"):
        normalise(load_raw(path), args())


def test_implicit_messages(tmp_path):
    head = [{"role": "system", "content": ""}, user("hi"), bot("hello"), user("fact?")]
    records = [
        {"chosen": head + [bot("Water boils at 100 C.")], "rejected": head + [bot("No.")]},
        {"chosen": head + [bot("Same.")], "rejected": head + [bot("Same.")]},  # identical: last reply split off
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    data = normalise(load_raw(path), args())
    assert data.format == "implicit_prompt" and data.kind == "messages"
    assert [r["prompt"] for r in data.records] == [head, head]
    assert data.records[0]["chosen"] == [bot("Water boils at 100 C.")] and data.identical == 1
    bad = {"chosen": head + [bot("a")], "rejected": head[:3] + [user("other"), bot("b")]}
    path = write_jsonl(tmp_path / "bad.jsonl", [bad])
    with pytest.raises(DataError, match=rf"^{path}, line 1, field 'chosen\[3\].role': 'user' after the shared messages"):
        normalise(load_raw(path), args())


TRIPLET = {"translation": {"language_pair": "de-en", "de": "Hallo", "en": "Hello", "gpt4_en": "Hi",
                           "alma_en": "Hallo", "gpt4_en_kiwi_xcomet": 0.9, "alma_en_kiwi_xcomet": 0.4}}


def test_mt_triplets_missing_reader(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "preftune.mt.readers", None)  # import fails
    path = write_jsonl(tmp_path / "mt.jsonl", [TRIPLET])
    with pytest.raises(DataError, match=rf"^{path}: looks like ALMA-R translation triplets.*preftune.mt.readers"):
        normalise(load_raw(path), args())


def test_mt_triplets_delegate_to_reader(tmp_path, monkeypatch):
    seen = {}

    def convert(raw_records, *, source, language_pairs, cpo_scorer, chat_style):
        seen.update(n=len(raw_records), source=source, pairs=language_pairs, scorer=cpo_scorer, chat=chat_style)
        return [{"prompt": "Translate: Hallo\n", "chosen": "Hello", "rejected": "Hallo"}], {"kept": 1, "skipped": 0}

    monkeypatch.setitem(sys.modules, "preftune.mt.readers", types.SimpleNamespace(triplets_to_preference_records=convert))
    path = write_jsonl(tmp_path / "mt.jsonl", [TRIPLET, TRIPLET])
    data = normalise(load_raw(path), args(language_pairs="de-en, en-de", cpo_scorer="kiwi_xcomet", chat_style=True))
    assert seen == {"n": 2, "source": path, "pairs": ["de-en", "en-de"], "scorer": "kiwi_xcomet", "chat": True}
    assert data.format == "mt_triplets" and data.kind == "text" and len(data.records) == 1
    assert "2 triplets: kept 1;" in data.describe() + ";"  # zero counts are left out

    def broken(raw_records, **_):
        raise ValueError(f"{path}: record 1: field 'translation.de' is missing")

    monkeypatch.setitem(sys.modules, "preftune.mt.readers", types.SimpleNamespace(triplets_to_preference_records=broken))
    with pytest.raises(DataError, match=r"record 1: field 'translation.de' is missing"):
        normalise(load_raw(path), args())


# ---------------------------------------------------------------- tokenisation and truncation


def test_standard_tokenisation_bos_and_single_eos(char_tok):
    records = [{"prompt": "Q:", "chosen": " yes", "rejected": " no</s>"}]
    pairs, stats = tokenize_records(records, char_tok, args())
    ids = char_tok.convert_tokens_to_ids
    assert pairs[0].prompt_ids == [0] + ids(list("Q:"))
    assert pairs[0].chosen_ids == ids(list(" yes")) + [1]
    assert pairs[0].rejected_ids == ids(list(" no")) + [1]  # EOS already there: not doubled
    assert stats.summary() == "data: 1 records, 0 prompts truncated, 0 completions truncated, 0 dropped"
    # A prompt that already starts with the BOS text gets one BOS, not two.
    (again,), _ = tokenize_records([{"prompt": "<s>Q:", "chosen": " y", "rejected": " n"}], char_tok, args())
    assert again.prompt_ids == pairs[0].prompt_ids


def test_truncate_pair_order_and_modes():
    prompt, chosen, rejected = [0] + list(range(10, 30)), list(range(100, 110)), list(range(200, 204))
    p, c, r, cut_p, cut_c, drop = truncate_pair(prompt, chosen, rejected, max_length=16, max_prompt_length=8,
                                                max_completion_length=None, truncation_mode="keep_end", bos_id=0)
    assert p == [0] + list(range(23, 30)) and cut_p  # BOS kept, then the prompt's end
    assert c == chosen[:8] and r == rejected and cut_c == 1 and drop is None
    p, *_ = truncate_pair(prompt, chosen, rejected, max_length=16, max_prompt_length=8,
                          max_completion_length=None, truncation_mode="keep_start")
    assert p == prompt[:8]
    # Fits: nothing is cut although the prompt is longer than max_prompt_length (TRL's rule).
    p, c, r, cut_p, cut_c, _ = truncate_pair(prompt, chosen, rejected, max_length=64, max_prompt_length=8,
                                             max_completion_length=None)
    assert p == prompt and not cut_p and cut_c == 0
    # max_completion_length caps first; no max_length: max_prompt_length always applies.
    p, c, r, cut_p, cut_c, _ = truncate_pair(prompt, chosen, rejected, max_length=None, max_prompt_length=5,
                                             max_completion_length=3, truncation_mode="keep_start")
    assert (len(p), len(c), len(r), cut_p, cut_c) == (5, 3, 3, True, 2)
    *_, drop = truncate_pair(prompt, chosen, rejected, max_length=21, max_prompt_length=None,
                             max_completion_length=None)
    assert drop == "prompt fills max_length"


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_counts_both_modes(char_tok, mode):
    long_prompt = "P" * 10 + "Question?"
    records = [
        {"prompt": long_prompt, "chosen": " " + "c" * 20, "rejected": " r"},  # prompt + completion cut
        {"prompt": "short", "chosen": " a", "rejected": " b"},  # untouched
        {"prompt": "tiny", "chosen": " " + "x" * 40, "rejected": " " + "y" * 40},  # both completions cut
    ]
    pairs, stats = tokenize_records(records, char_tok,
                                    args(max_length=24, max_prompt_length=8, truncation_mode=mode))
    assert (stats.prompts_truncated, stats.completions_truncated, stats.num_dropped) == (1, 3, 0)
    assert stats.summary() == "data: 3 records, 1 prompts truncated, 3 completions truncated, 0 dropped"
    first = "".join(char_tok.convert_ids_to_tokens(pairs[0].prompt_ids))
    assert first == ("<s>" + long_prompt[-7:] if mode == "keep_end" else "<s>" + long_prompt[:7])
    assert all(len(p.prompt_ids) + len(p.chosen_ids) <= 24 for p in pairs)
    assert pairs[1].chosen_ids[-1] == char_tok.eos_token_id


def test_drops_are_counted_and_logged(char_tok, tmp_path, caplog):
    records = [pair(0), {"prompt": "x" * 30, "chosen": " a", "rejected": " b"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with caplog.at_level(logging.INFO, logger="preftune.data"):
        data = build_datasets(DataArguments(dataset=path, max_length=20, max_prompt_length=None), char_tok, seed=0)
    assert len(data.train) == 1 and data.train_stats.dropped == {"prompt fills max_length": 1}
    expected = "data: 2 records, 0 prompts truncated, 0 completions truncated, 1 dropped (prompt fills max_length: 1)"
    assert expected in data.report.splitlines()
    assert expected in caplog.messages
    assert sum("format standard" in m for m in caplog.messages) == 1
    with pytest.raises(DataError, match="every training pair was dropped"):
        build_datasets(DataArguments(dataset=path + "#1", max_length=3, max_prompt_length=None), char_tok, seed=0)


# ---------------------------------------------------------------- split and entry point


def test_split_is_deterministic():
    a = split_indices(100, 0.2, seed=7)
    assert a == split_indices(100, 0.2, seed=7)
    assert a != split_indices(100, 0.2, seed=8)
    train, held = a
    assert len(held) == 20 and sorted(train + held) == list(range(100))
    with pytest.raises(DataError, match="cannot be split"):
        split_indices(1, 0.5, seed=0)


def test_build_datasets_eval_ratio_file_and_demo(char_tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pair(i) for i in range(20)])
    one = build_datasets(args(dataset=path, eval_ratio=0.25), char_tok, seed=3)
    two = build_datasets(args(dataset=path, eval_ratio=0.25), char_tok, seed=3)
    assert len(one.train) == 15 and len(one.eval) == 5
    assert [p.prompt_ids for p in one.eval] == [p.prompt_ids for p in two.eval]
    assert {tuple(p.prompt_ids) for p in one.eval}.isdisjoint(tuple(p.prompt_ids) for p in one.train)
    eval_path = write_jsonl(tmp_path / "e.jsonl", [pair(i) for i in range(100, 103)])
    sep = build_datasets(args(dataset=path, eval_file=eval_path), char_tok, seed=0)
    assert len(sep.train) == 20 and len(sep.eval) == 3 and "eval data: 3 records" in sep.report
    with pytest.raises(DataError, match="not both"):
        build_datasets(args(dataset=path, eval_file=eval_path, eval_ratio=0.1), char_tok, seed=0)
    demo = build_datasets(DataArguments(), char_tok, seed=0)
    assert demo.format == "standard" and demo.eval is None and 48 <= len(demo.train) <= 64


# --------------------------------------------------------------------------------------------
# Issue 25 (first part): numbers checked before loading, text checked where it is read
# --------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("group, name, value", [
    ("LossArguments", "beta", NAN), ("LossArguments", "beta", INF), ("LossArguments", "simpo_gamma", INF),
    ("LossArguments", "simpo_gamma", NAN), ("LossArguments", "cpo_alpha", NAN), ("LossArguments", "cpo_alpha", INF),
    ("LossArguments", "rpo_alpha", NAN), ("LossArguments", "rpo_alpha", INF),
    ("LossArguments", "f_alpha_divergence_coef", NAN), ("LossArguments", "discopop_tau", INF)])
def test_group_numbers_finite_and_in_range(group, name, value):
    """The loss group's floats, given in Python (the TRL door's path), are refused in one line naming
    the flag and its range (preftune.constraints.RANGES; the other groups' floats were already checked)."""
    import preftune.config as config
    from preftune.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^--{name} must be .*got {value}$"):
        getattr(config, group)(**{name: value})


@pytest.mark.parametrize("cls, name, value", [("CPOConfig", "beta", NAN), ("CPOConfig", "simpo_gamma", INF),
                                              ("CPOConfig", "cpo_alpha", NAN), ("DPOConfig", "learning_rate", INF),
                                              ("DPOConfig", "max_grad_norm", NAN), ("ORPOConfig", "weight_decay", NAN),
                                              ("DPOConfig", "rpo_alpha", INF), ("RewardConfig", "adam_beta2", NAN)])
def test_trl_configs_check_numbers_before_loading(cls, name, value, tmp_path):
    """preftune.trl's configs use the same table; the message starts with the class name."""
    import preftune.trl as trl
    from preftune.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^{cls}: --{name} must be .*got {value}$"):
        getattr(trl, cls)(output_dir=str(tmp_path), **{name: value})


def test_constraints_table_covers_the_groups_floats():
    """Every float field of the configuration groups has its range in the one table."""
    import dataclasses

    from preftune.config import GROUPS
    from preftune.constraints import RANGES

    floats = {f.name for group in GROUPS for f in dataclasses.fields(group) if "float" in str(f.type)}
    assert floats - set(RANGES) == set()


@pytest.mark.parametrize("record, field", [
    ({"prompt": "Q:\ud800", "chosen": "a", "rejected": "b"}, "'prompt'"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "\udfff x"}],
      "rejected": [{"role": "assistant", "content": "y"}]}, r"'chosen\[0\]\.content'"),
    ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "a\ud834"}]}],
      "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]},
     r"'prompt\[0\]\.content\[0\]\.text'"),
])
def test_lone_surrogate_refused_naming_file_record_field(tmp_path, record, field):
    path = tmp_path / "s.jsonl"
    good = {"prompt": "Q:", "chosen": "a", "rejected": "b"} if isinstance(record["prompt"], str) else \
        {**record, "prompt": [{"role": "user", "content": "ok"}], "chosen": [{"role": "assistant", "content": "x"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")  # json.dumps writes "\ud800" escapes
    with pytest.raises(DataError, match=rf"s\.jsonl, line 2, field {field}: invalid Unicode: a lone surrogate"):
        normalise(load_raw(str(path)), DataArguments())


def test_duplicate_json_key_refused_naming_record_and_key(tmp_path):
    nested = tmp_path / "nested.json"
    nested.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": '
                      '[{"role": "assistant", "content": "x", "content": "y"}], "rejected": "c"}]')
    with pytest.raises(DataError, match=r"nested\.json, record 2: key 'content' appears twice"):
        load_raw(str(nested))
    lines = tmp_path / "lines.json"  # JSON lines in a .json file: the line is named
    lines.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "prompt": "b"}\n')
    with pytest.raises(DataError, match=r"lines\.json, line 2: key 'prompt' appears twice"):
        load_raw(str(lines))


@pytest.mark.parametrize("spec, match", [("f.jsonl#²", r"--dataset 'f\.jsonl#²'.*got '²'"),
                                         ("f.jsonl#١٢", "got '١٢'"), ("", r"--dataset '': empty"),
                                         ("  ", "empty"), ("#5", "empty path")])
def test_parse_spec_ascii_digits_and_empty(spec, match):
    with pytest.raises(DataError, match=match):
        parse_spec(spec)


def test_eval_file_errors_name_eval_file(tmp_path):
    from preftune.errors import ConfigError

    with pytest.raises((ConfigError, DataError), match=r"^--eval_file .* is a directory"):
        DataArguments(eval_file=[str(tmp_path)])
    with pytest.raises((ConfigError, DataError), match=r"^--eval_file 'x\.jsonl#0'"):
        DataArguments(eval_file="x.jsonl#0")


def test_generate_adapter_without_adapter_config_is_one_line(tmp_path, capsys):
    """Refused before the base model loads (no model given: the default would be downloaded)."""
    from preftune.cli import main

    assert main(["generate", "--adapter", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("preftune generate: error: --adapter ") and str(tmp_path) in err[0]
    assert "adapter_config.json" in err[0]


def test_large_files_tokenise_block_by_block_under_a_progress_bar_with_the_same_result(monkeypatch, capsys):
    """A file over PROGRESS_BLOCK records: tokenised in blocks (a tqdm bar on stderr), the same pairs, counts and
    kept indices as in one call."""
    from conftest import byte_tokenizer

    from preftune.config import DataArguments
    from preftune.data import build_datasets, pipeline

    tok = byte_tokenizer()
    args = DataArguments(max_length=64, max_prompt_length=32)
    whole = build_datasets(args, tok, seed=0)
    monkeypatch.setattr(pipeline, "PROGRESS_BLOCK", 5)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    capsys.readouterr()
    blocks = build_datasets(args, tok, seed=0)
    assert "tokenising" in capsys.readouterr().err
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in blocks.train] == \
        [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in whole.train]
    assert blocks.train_stats.summary() == whole.train_stats.summary()
    assert blocks.train_files[0][2].kept_index == whole.train_files[0][2].kept_index
