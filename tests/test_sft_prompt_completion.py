"""TRL's SFT prompt-completion records (format ``prompt_completion``, --loss sft only) and the ALMA-R
stage-1 data writer ``experiments/mt/make_sft_data.py``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import byte_tokenizer

from preftune.cli import main
from preftune.config import DataArguments
from preftune.data import DataError, build_datasets, load_raw, normalise, tokenize_records
from preftune.data.formats import detect_format
from preftune.data.pipeline import check_preference_signal
from preftune.mt.triplets import make_triplet_record, triplets_to_preference_records

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Translate this from German to English:\nGerman: Guten Morgen, liebe Freunde.\nEnglish:"
COMPLETION = " Good morning, dear friends."


def _load_script():
    spec = importlib.util.spec_from_file_location("make_sft_data", ROOT / "experiments" / "mt" / "make_sft_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_sft_data = _load_script()


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def test_detected_and_normalised_with_the_completion_as_chosen(tmp_path):
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"prompt": [{"role": "user", "content": "a"}],
                          "completion": [{"role": "assistant", "content": "b"}]}) == "prompt_completion"
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "standard"  # unchanged
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": PROMPT, "completion": COMPLETION, "id": 1}] * 3)
    data = normalise(load_raw(path), DataArguments())
    assert data.format == "prompt_completion" and data.kind == "text" and data.identical == 0
    assert data.records[0] == {"prompt": PROMPT, "chosen": COMPLETION, "rejected": ""}
    assert "--loss sft only" in data.describe()
    forced = normalise(load_raw(path), DataArguments(dataset_format="prompt-completion"))
    assert forced.format == "prompt_completion"


@pytest.mark.parametrize("limits", [(None, None, None), (40, 30, None), (60, 50, 12)])
def test_tokens_equal_a_standard_record_with_the_same_prompt_and_chosen(tok, limits):
    max_length, max_prompt_length, max_completion_length = limits
    args = DataArguments(max_length=max_length, max_prompt_length=max_prompt_length,
                         max_completion_length=max_completion_length)
    (pc,), pc_stats = tokenize_records(normalise(_raw([{"prompt": PROMPT, "completion": COMPLETION}]), args).records,
                                       tok, args)
    (std,), std_stats = tokenize_records([{"prompt": PROMPT, "chosen": COMPLETION, "rejected": COMPLETION}], tok, args)
    assert pc.prompt_ids == std.prompt_ids and pc.chosen_ids == std.chosen_ids
    assert pc.rejected_ids == [tok.eos_token_id]  # the rejected side: one token
    assert pc_stats.prompts_truncated == std_stats.prompts_truncated
    assert pc_stats.completions_truncated == std_stats.completions_truncated / 2  # standard counts both sides
    assert pc_stats.boundary_mismatches == 0 and pc_stats.identical == 0


def test_message_lists_tokenise_like_conversational_records(chat_tok):
    prompt = [{"role": "user", "content": PROMPT}]
    completion = [{"role": "assistant", "content": COMPLETION.strip()}]
    (pc,), _ = tokenize_records(normalise(_raw([{"prompt": prompt, "completion": completion}]), DataArguments()).records,
                                chat_tok, DataArguments())
    (std,), _ = tokenize_records([{"prompt": prompt, "chosen": completion, "rejected": completion}], chat_tok,
                                 DataArguments())
    assert pc.prompt_ids == std.prompt_ids and pc.chosen_ids == std.chosen_ids
    assert pc.rejected_ids == [chat_tok.eos_token_id]


def _raw(records):
    from preftune.data.pipeline import records_to_raw

    return records_to_raw(records, "records")


def test_bad_records_name_their_field(tmp_path):
    cases = [({"prompt": PROMPT, "completion": "  "}, "'completion': empty"),
             ({"prompt": PROMPT, "completion": COMPLETION, "label": False}, "'label'"),
             ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]},
              "'completion[0].role'")]
    for record, fragment in cases:
        good = {"prompt": PROMPT, "completion": COMPLETION}
        path = write_jsonl(tmp_path / "bad.jsonl", [good, good, record])  # a labelled record is KTO's format
        with pytest.raises(DataError, match="line 3") as err:
            normalise(load_raw(path), DataArguments())
        assert fragment in str(err.value)


def test_only_sft_trains_on_them_and_the_report_counts(tok, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": PROMPT, "completion": COMPLETION * 4}] * 4)
    std = write_jsonl(tmp_path / "std.jsonl", [{"prompt": "Q:", "chosen": " Good.", "rejected": " Bad."}] * 4)
    data = build_datasets(DataArguments(dataset=path, max_length=120, max_prompt_length=80), tok, seed=0)
    assert "data: 4 records, 4 prompts truncated, 4 completions truncated, 0 dropped" in data.report
    assert check_preference_signal(data.train, "sft") == 0
    for loss in ("cpo", "dpo", "simpo", "orpo", "rm"):
        with pytest.raises(DataError, match=f"pc.jsonl: prompt/completion records .*no rejected answer; only "
                                            f"--loss sft can train on them, not --loss {loss}"):
            check_preference_signal(data.train, loss)
    mixed = build_datasets(DataArguments(dataset=[std, path]), tok, seed=0)  # one file without rejected: refused
    with pytest.raises(DataError, match="pc.jsonl"):
        check_preference_signal(mixed.train, "cpo")
    as_eval = build_datasets(DataArguments(dataset=std, eval_file=path), tok, seed=0)
    with pytest.raises(DataError, match="pc.jsonl"):
        check_preference_signal(as_eval.train, "cpo")
    assert check_preference_signal(build_datasets(DataArguments(dataset=std), tok, seed=0).train, "cpo") == 0
    dropped = build_datasets(DataArguments(dataset=[std, path], max_length=70, max_prompt_length=None), tok, seed=0)
    assert f"data: {path}: 4 records, 0 prompts truncated, 0 completions truncated, 4 dropped (prompt fills " \
           "max_length: 4)" in dropped.report  # per file: the prompt/completion pairs whose prompt fills max_length are counted


def _flags(model_dir, out, data, *extra):
    return ["train", "--model_name_or_path", model_dir, "--output_dir", str(out), "--dataset", data, "--use_peft",
            "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-2", "--max_length", "160", "--max_prompt_length", "128", "--save_strategy", "no",
            "--report_to", "none", "--logging_steps", "1", "--dataloader_num_workers", "0", *extra]


def test_cli_sft_trains_and_cpo_is_refused_naming_the_file(tiny_model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": PROMPT, "completion": COMPLETION}] * 4)
    assert main(_flags(tiny_model_dir, tmp_path / "sft", path, "--loss", "sft")) == 0
    assert (tmp_path / "sft" / "adapter_config.json").is_file()
    assert "format prompt_completion" in (tmp_path / "sft" / "data_report.txt").read_text()
    capsys.readouterr()
    assert main(_flags(tiny_model_dir, tmp_path / "cpo", path, "--loss", "cpo")) == 2
    err = capsys.readouterr().err
    assert "pc.jsonl" in err and "no rejected answer" in err and "--loss sft" in err and "Traceback" not in err


def test_cli_evaluate_refuses_prompt_completion_for_preference_losses(tiny_model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": PROMPT, "completion": COMPLETION}] * 2)
    assert main(["evaluate", "--model_name_or_path", tiny_model_dir, "--dataset", path, "--loss", "dpo"]) == 2
    err = capsys.readouterr().err
    assert "pc.jsonl" in err and "no rejected answer" in err and "only --loss sft can evaluate" in err
    assert "Traceback" not in err


def test_make_sft_data_matches_the_triplet_path(tmp_path, capsys):
    src, tgt = tmp_path / "train.de", tmp_path / "train.en"
    src.write_text("Eins.\nZwei.\n\nDrei.\nVier.\nFünf.\n", encoding="utf-8")
    tgt.write_text("One.\nTwo.\nThree?\n Three.\nFour.\nFive.\n", encoding="utf-8")
    held_out = tmp_path / "valid.de-en.json"
    held_out.write_text(json.dumps([{"translation": {"de": "Vier.", "en": "Four."}}]), encoding="utf-8")
    out = tmp_path / "sft.jsonl"
    argv = ["--pair", "de-en", "--src", str(src), "--tgt", str(tgt), "--output", str(out), "--skip", "1",
            "--limit", "3", "--exclude", str(held_out)]
    assert make_sft_data.main(argv) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts == {"output": str(out), "lines": 6, "skipped_lines": 1, "empty": 1, "excluded": 1, "written": 3,
                      "not_read": 0}
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["completion"] for r in records] == [" Two.", " Three.", " Five."]
    triplet = make_triplet_record("de", "en", "Zwei.", "Two.", {"sys": "Two!"}, {"chrf": {"ref": 100.0, "sys": 50.0}})
    (pair,), _ = triplets_to_preference_records([triplet], source="t", language_pairs="de-en", cpo_scorer="chrf",
                                                chat_style=False)
    assert records[0] == {"prompt": pair["prompt"], "completion": pair["chosen"]}
    chat = make_sft_data.make_record("de", "en", "Zwei.", "Two.", chat_style=True)
    (chat_pair,), _ = triplets_to_preference_records([triplet], source="t", language_pairs="de-en",
                                                     cpo_scorer="chrf", chat_style=True)
    assert chat == {"prompt": chat_pair["prompt"], "completion": chat_pair["chosen"]}
    assert detect_format(chat) == "prompt_completion" and detect_format(records[0]) == "prompt_completion"
    tgt.write_text("One.\n", encoding="utf-8")
    assert make_sft_data.main(argv) == 1 and "line counts differ" in capsys.readouterr().err


def test_python_api_cpo_trainer_refuses_them(tiny_model_dir, tmp_path):
    from preftune.trl import CPOConfig, CPOTrainer

    records = [{"prompt": PROMPT, "completion": COMPLETION}] * 2
    with pytest.raises(DataError, match="train_dataset: prompt/completion records .*not --loss cpo"):
        CPOTrainer(model=tiny_model_dir, args=CPOConfig(output_dir=str(tmp_path / "api"), report_to="none"),
                   train_dataset=records)
