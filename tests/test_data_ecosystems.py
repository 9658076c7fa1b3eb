"""Data from other ecosystems (ms-swift 2.x / 3.x, LLaMA-Factory ShareGPT and Alpaca ranking): one
conversation in every format gives TRL's conversational tokens and loss; whole-file detection and
its errors; --columns; several files; --dataset_format; --dataset_sample; images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import byte_tokenizer, tiny_llama

from preftune.cli import main
from preftune.cli_args import parse_groups
from preftune.config import ConfigError, DataArguments, LossArguments
from preftune.data import DataError, build_datasets, load_raw, normalise, tokenize_records
from preftune.engine.layout import collate_pairs
from preftune.engine.logprobs import sequence_logps
from preftune.losses import compute_loss

# ChatML-like template; every turn ends with the EOS text "</s>" (then a newline, cut by the tokeniser).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# (system, history, question, chosen, rejected); the question has two lines so that Alpaca's
# instruction + "\n" + input is exercised.
CONVERSATIONS = [
    ("You are terse.", [("Hi", "Hello!"), ("How are you?", "Fine.")], "Name a colour.\nOne word.", "Blue.", "No."),
    (None, [], "2 + 2?\nDigits only.", "4", "5"),
]


def trl(system, history, question, chosen, rejected):
    prompt = [{"role": "system", "content": system}] if system else []
    for q, r in history:
        prompt += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    prompt.append({"role": "user", "content": question})
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def swift2(system, history, question, chosen, rejected):
    record = {"query": question, "response": chosen, "rejected_response": rejected,
              "history": [list(turn) for turn in history]}
    return {**record, "system": system} if system else record


def swift3_response(*conv):
    t = trl(*conv)
    return {"messages": t["prompt"] + t["chosen"], "rejected_response": conv[4]}


def swift3_messages(*conv):
    t = trl(*conv)
    return {"messages": t["prompt"] + t["chosen"], "rejected_messages": t["prompt"] + t["rejected"]}


def sharegpt_from(system, history, question, chosen, rejected):
    turns = []
    for q, r in history:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": r}]
    turns.append({"from": "human", "value": question})
    record = {"conversations": turns, "chosen": {"from": "gpt", "value": chosen},
              "rejected": {"from": "gpt", "value": rejected}}
    return {**record, "system": system} if system else record  # top-level system, LLaMA-Factory style


def sharegpt_role(*conv):
    t = trl(*conv)  # system as the first turn, role/content spelling, rejected as a plain string
    return {"conversations": t["prompt"], "chosen": t["chosen"][0], "rejected": conv[4]}


def alpaca(system, history, question, chosen, rejected):
    instruction, extra = question.split("\n")
    record = {"instruction": instruction, "input": extra, "chosen": chosen, "rejected": rejected,
              "history": [list(turn) for turn in history]}
    return {**record, "system": system} if system else record


WRITERS = {"swift2": swift2, "swift3 rejected_response": swift3_response, "swift3 rejected_messages": swift3_messages,
           "sharegpt from/value": sharegpt_from, "sharegpt role/content": sharegpt_role, "alpaca": alpaca}


@pytest.fixture(scope="module")
def tok():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(vocab_size=len(tok), layers=1)


def write_jsonl(path, records):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def free(**kw):
    return DataArguments(max_length=None, max_prompt_length=None, **kw)


def first_loss(model, pairs):
    batch = collate_pairs(pairs, share_prompt=True, padding_free=True)
    with torch.no_grad():
        logps = sequence_logps(model, batch)
    return compute_loss(logps, LossArguments(loss="cpo")).losses.mean().item()


@pytest.fixture(scope="module")
def reference(tok, model, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("trl") / "trl.jsonl", [trl(*c) for c in CONVERSATIONS])
    data = build_datasets(free(dataset=path), tok, seed=0)
    assert data.format == "conversational"
    return data.train, first_loss(model, data.train)


def test_trl_reference_is_the_chat_template(tok, reference):
    pairs, _ = reference
    for pair, conv in zip(pairs, CONVERSATIONS):
        messages = trl(*conv)
        rendered = tok.apply_chat_template(messages["prompt"], tokenize=False, add_generation_prompt=True)
        assert pair.prompt_ids == tok(rendered, add_special_tokens=False)["input_ids"]
        assert tok.decode(pair.chosen_ids) == conv[3] + "</s>" and tok.decode(pair.rejected_ids) == conv[4] + "</s>"
    assert "Hello!" in tok.decode(pairs[0].prompt_ids) and "You are terse." in tok.decode(pairs[0].prompt_ids)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_format_gives_trl_tokens_and_loss(tok, model, reference, tmp_path, writer):
    pairs, loss = reference
    path = write_jsonl(tmp_path / "d.jsonl", [WRITERS[writer](*c) for c in CONVERSATIONS])
    data = build_datasets(free(dataset=path), tok, seed=0)
    assert data.format == writer.split()[0]
    assert f"format {data.format} (" in data.report and "detected from the fields of 2 of 2 records" in data.report
    got = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in data.train]
    assert got == [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    assert abs(first_loss(model, data.train) - loss) <= 1e-6


def test_sharegpt_demo_shape_is_not_an_implicit_prompt(tmp_path):
    """The issue's LLaMA-Factory file: chosen/rejected objects (and strings) next to conversations."""
    records = [sharegpt_from(*CONVERSATIONS[1]), {**sharegpt_from(*CONVERSATIONS[1]), "chosen": "4", "rejected": "5"}]
    data = normalise(load_raw(write_jsonl(tmp_path / "d.jsonl", records)), free())
    assert data.format == "sharegpt" and data.records[0] == data.records[1]


def test_detection_uses_every_record(tmp_path):
    # record 1 alone fits standard and alpaca; records 2-3 only alpaca: the file is alpaca
    both = {"prompt": "p", "instruction": "q", "chosen": "a", "rejected": "b"}
    only = {"instruction": "q", "chosen": "a", "rejected": "b"}
    data = normalise(load_raw(write_jsonl(tmp_path / "d.jsonl", [both, only, only])), free())
    assert data.format == "alpaca" and "detected from the fields of 3 of 3 records" in data.describe()


def test_no_format_lists_field_sets(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=rf"^{path}, line 1: cannot detect the data format") as err:
        normalise(load_raw(path), free())
    for expected in ("'question', 'answer'", "swift2: query (str), response (str), rejected_response (str)",
                     "sharegpt: conversations (list)", "alpaca: instruction (str)", "--columns"):
        assert expected in str(err.value)


def test_ambiguous_format(tmp_path):
    both = {"prompt": "p", "instruction": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "d.jsonl", [both, both])
    with pytest.raises(DataError, match=rf"^{path}: the records fit more than one data format equally: "
                                        r"standard \(2 records, first line 1\), alpaca \(2 records.*--dataset_format"):
        normalise(load_raw(path), free())
    # a file mixing two formats half and half is ambiguous too
    path = write_jsonl(tmp_path / "mixed.jsonl", [swift2(*CONVERSATIONS[1]), alpaca(*CONVERSATIONS[1])])
    with pytest.raises(DataError, match="swift2 .1 records, first line 1., alpaca .1 records, first line 2"):
        normalise(load_raw(path), free())


@pytest.mark.parametrize("record, field, problem", [
    (swift2(*CONVERSATIONS[1]), "conversations", "missing"),  # another format's record in a ShareGPT file
    ({**sharegpt_from(*CONVERSATIONS[1]), "chosen": {"from": "human", "value": "x"}}, "chosen", "a 'user' turn"),
    ({**sharegpt_from(*CONVERSATIONS[1]), "conversations": [{"from": "human", "value": "q"},
                                                            {"from": "gpt", "value": "a"}]},
     "conversations", "must end with a human"),
    ({**sharegpt_from(*CONVERSATIONS[1]), "conversations": [{"from": "gpt", "value": "q"}]},
     r"conversations\[0\]", "'assistant' turn where a 'user' turn is due"),
    ({**sharegpt_from(*CONVERSATIONS[1]), "conversations": [{"from": "observation", "value": "q"}]},
     r"conversations\[0\].from", "'observation' turns .tool use. are not supported"),
])
def test_sharegpt_record_errors(tmp_path, record, field, problem):
    good = sharegpt_from(*CONVERSATIONS[0])
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, record])
    with pytest.raises(DataError, match=rf"^{path}, line 3, field '{field}': {problem}"):
        normalise(load_raw(path), free())


@pytest.mark.parametrize("writer, change, field, problem", [
    (swift2, {"history": [["only one"]]}, r"history\[0\]", "expected a \\[query, response\\] pair"),
    (swift2, {"response": 3}, "response", r"expected a string \(swift2 format, detected from line 1\)"),
    (swift3_response, {"margin": "big"}, "margin", "expected a number"),
    (swift3_response, {"rejected_messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "rejected_messages", "given together with 'rejected_response'"),
    (swift3_messages, {"rejected_messages": [{"role": "user", "content": "other"},
                                             {"role": "assistant", "content": "y"}]},
     "rejected_messages", "differs from 'messages' before the last user message"),
    (swift3_messages, {"messages": [{"role": "user", "content": "q"}]}, "messages", "ends with a user message"),
    (alpaca, {"instruction": "", "input": ""}, "instruction", "empty"),
])
def test_swift_and_alpaca_record_errors(tmp_path, writer, change, field, problem):
    good = writer(*CONVERSATIONS[0])
    path = write_jsonl(tmp_path / "d.jsonl", [good, {**good, **change}])
    with pytest.raises(DataError, match=rf"^{path}, line 2, field '{field}': {problem}"):
        normalise(load_raw(path), free())


def test_swift3_margin_and_history_string(tmp_path):
    record = {**swift3_response(*CONVERSATIONS[0]), "margin": 2}
    legacy = {**swift2(*CONVERSATIONS[0]), "history": json.dumps(CONVERSATIONS[0][1])}  # CSV-style string
    data = normalise(load_raw(write_jsonl(tmp_path / "s3.jsonl", [record])), free())
    assert data.records[0]["margin"] == 2.0 and isinstance(data.records[0]["margin"], float)
    old = normalise(load_raw(write_jsonl(tmp_path / "s2.jsonl", [legacy])), free())
    assert old.records[0]["prompt"] == data.records[0]["prompt"] == trl(*CONVERSATIONS[0])["prompt"]


# ---------------------------------------------------------------- --columns, --dataset_format, files


def test_columns_rename_before_detection(tok, tmp_path):
    records = [{"question": "Q1:", "good": " yes", "bad": " no"}, {"question": "Q2:", "good": " a", "bad": " b"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    for spec in (["question=prompt", "good=chosen", "bad=rejected"],
                 ['{"question": "prompt", "good": "chosen", "bad": "rejected"}']):
        args = free(dataset=path, columns=spec)
        assert args.columns == ["question=prompt", "good=chosen", "bad=rejected"]
        data = build_datasets(args, tok, seed=0)
        assert data.format == "standard" and len(data.train) == 2
    with pytest.raises(DataError, match=r"--columns: no record of .*d.jsonl has the field\(s\) 'answer'"):
        build_datasets(free(dataset=path, columns=["answer=chosen", "question=prompt"]), tok, seed=0)
    with pytest.raises(DataError, match=r"line 1, field 'chosen': --columns renames a field onto 'chosen'"):
        build_datasets(free(dataset=write_jsonl(tmp_path / "c.jsonl", [{**records[0], "chosen": "x"}]),
                            columns=["good=chosen"]), tok, seed=0)


@pytest.mark.parametrize("spec, problem", [
    (["question"], "expected old=new"), (["=prompt"], "non-empty"), (["a=b", "a=c"], "renamed twice"),
    (["a=x", "b=x"], "two columns are renamed to 'x'"), (["{not json"], "not a JSON object"),
])
def test_bad_columns_spec(spec, problem):
    with pytest.raises(ConfigError, match=problem):
        DataArguments(columns=spec)


def test_dataset_format_forces(tok, tmp_path):
    both = {"prompt": "p", "instruction": "Say hi.", "chosen": "Hi!", "rejected": "No."}
    path = write_jsonl(tmp_path / "d.jsonl", [both, both])
    data = build_datasets(free(dataset=path, dataset_format="alpaca"), tok, seed=0)
    assert data.format == "alpaca" and "forced by --dataset_format" in data.report
    assert DataArguments(dataset_format=["swift"]).dataset_format == ["swift3"]  # alias
    with pytest.raises(DataError, match=r"line 1, field 'conversations': missing"):
        build_datasets(free(dataset=path, dataset_format="sharegpt"), tok, seed=0)
    with pytest.raises(ConfigError, match="unknown data format 'nope'"):
        DataArguments(dataset_format="nope")
    with pytest.raises(ConfigError, match="2 names for 3 --dataset files"):
        DataArguments(dataset=["a", "b", "c"], dataset_format=["alpaca", "auto"])


def test_several_files_each_with_its_format(tok, tmp_path):
    swift_path = write_jsonl(tmp_path / "a.jsonl", [swift2(*c) for c in CONVERSATIONS * 2])
    share_path = tmp_path / "b.json"
    share_path.write_text(json.dumps([sharegpt_from(*c) for c in CONVERSATIONS]))
    args = free(dataset=[swift_path + "#3", str(share_path)])
    data = build_datasets(args, tok, seed=0)
    assert data.format == "swift2+sharegpt" and len(data.train) == 5
    assert [(source, fmt, stats.records) for source, fmt, stats in data.train_files] == [
        (swift_path, "swift2", 3), (str(share_path), "sharegpt", 2)]
    lines = data.report.splitlines()
    assert f"data: 2 files, 5 records ({swift_path}: 3, {share_path}: 2)" in lines
    assert any(line.startswith(f"data: {swift_path}: 3 records (first 3 asked), format swift2") for line in lines)
    assert f"data: {share_path}: 2 records, 0 prompts truncated, 0 completions truncated, 0 dropped" in lines
    assert "data: 5 records, 0 prompts truncated, 0 completions truncated, 0 dropped" in lines
    # per-file forcing, and an eval split drawn over both files
    split = build_datasets(free(dataset=[swift_path, str(share_path)], dataset_format=["swift2", "auto"],
                                eval_ratio=0.5), tok, seed=1)
    assert len(split.train) + len(split.eval) == 6 and len(split.eval) == 3


def test_dataset_list_from_flags_yaml_and_python(tmp_path):
    (_, _, data_args, *_) = parse_groups(["--dataset", "a.jsonl#10", "b.json", "--columns", "q=prompt"])
    assert data_args.dataset == ["a.jsonl#10", "b.json"] and data_args.columns == ["q=prompt"]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"dataset": "a.jsonl", "columns": {"q": "prompt"}, "dataset_format": "sharegpt"}))
    (_, _, data_args, *_) = parse_groups([str(config)])
    assert data_args.dataset == ["a.jsonl"] and data_args.columns == ["q=prompt"]
    assert data_args.dataset_format == ["sharegpt"]
    assert DataArguments(dataset="x.jsonl", eval_file="y.jsonl").eval_file == ["y.jsonl"]


def test_random_sample(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "chosen": "a", "rejected": "b"} for i in range(10)])
    first = load_raw(path + "#4")
    drawn = load_raw(path + "#4", sample="random", seed=3)
    assert [r["prompt"] for r in first.records] == ["Q0", "Q1", "Q2", "Q3"]
    assert drawn.records == load_raw(path + "#4", sample="random", seed=3).records
    assert len({r["prompt"] for r in drawn.records}) == 4 and drawn.records != first.records
    assert drawn.locations == sorted(drawn.locations, key=lambda loc: int(loc.split()[1]))
    assert "random 4 of 10, seed 3" in drawn.describe()
    more = load_raw(path + "#25", sample="random", seed=0)
    counts = [sum(r["prompt"] == f"Q{i}" for r in more.records) for i in range(10)]
    assert len(more.records) == 25 and min(counts) == 2 and max(counts) == 3


# ---------------------------------------------------------------- images


def image_record(images, **extra):
    return {**swift3_response(*CONVERSATIONS[1]), "images": images, **extra}


def test_images_resolved_and_text_only_tokenizer_refuses(tok, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"x")
    path = write_jsonl(tmp_path / "d.jsonl", [image_record(["img/a.png"]), image_record("img/a.png")])
    data = normalise(load_raw(path), free())
    expected = str((tmp_path / "img" / "a.png").resolve())
    assert [r["images"] for r in data.records] == [[expected], [expected]]
    assert "2 records with images" in data.describe()
    with pytest.raises(DataError, match=rf"^{path}, line 1, field 'images': 1 image\(s\) given, but the model's "
                                        r"tokenizer \(\w+\) is text-only"):
        build_datasets(free(dataset=path), tok, seed=0)
    with pytest.raises(DataError, match=r"field 'images': 1 image"):
        tokenize_records(data.records, tok, free())


@pytest.mark.parametrize("images, problem", [
    (["../outside.png"], "outside the data file's folder"),
    (["missing.png"], "no such image file"),
    ([3], "expected an image path or URL string, got int"),
])
def test_bad_image_paths(tmp_path, images, problem):
    inner = tmp_path / "data"
    inner.mkdir()
    (tmp_path / "outside.png").write_bytes(b"x")  # exists, but outside the data folder
    path = write_jsonl(inner / "d.jsonl", [image_record(images)])
    with pytest.raises(DataError, match=rf"^{path}, line 1, field 'images\[0\]': .*{problem}"):
        normalise(load_raw(path), free())


def test_trl_image_parts(tok, tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    t = trl(*CONVERSATIONS[1])
    t["prompt"][-1]["content"] = [{"type": "image"}, {"type": "text", "text": CONVERSATIONS[1][2]}]
    data = normalise(load_raw(write_jsonl(tmp_path / "d.jsonl", [{**t, "images": ["a.png"]}])), free())
    assert data.records[0]["images"] == [str((tmp_path / "a.png").resolve())]
    assert data.records[0]["prompt"][-1]["content"][0] == {"type": "image"}  # kept for a VL processor
    with pytest.raises(DataError, match=r"line 1, field 'images': missing; the messages hold 1 image parts"):
        normalise(load_raw(write_jsonl(tmp_path / "e.jsonl", [t])), free())
    # text-only parts are joined: the same tokens as the plain string
    text = trl(*CONVERSATIONS[1])
    parts = trl(*CONVERSATIONS[1])
    parts["prompt"][-1]["content"] = [{"type": "text", "text": line} for line in ("2 + 2?\n", "Digits only.")]
    a = build_datasets(free(dataset=write_jsonl(tmp_path / "t.jsonl", [text])), tok, seed=0).train
    b = build_datasets(free(dataset=write_jsonl(tmp_path / "p.jsonl", [parts])), tok, seed=0).train
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in a] == [(p.prompt_ids, p.chosen_ids, p.rejected_ids)
                                                                          for p in b]


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def chat_model_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat")
    model = tiny_llama(vocab_size=len(tok), layers=1)
    model.config.max_position_embeddings = 2048
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("writer", ["swift2", "sharegpt from/value"])
def test_cli_trains_on_ecosystem_file(chat_model_dir, tmp_path, writer):
    path = write_jsonl(tmp_path / "d.jsonl", [WRITERS[writer](*c) for c in CONVERSATIONS * 2])
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", chat_model_dir, "--dataset", path, "--output_dir", str(out),
                 "--use_peft", "--lora_r", "2", "--max_steps", "1", "--per_device_train_batch_size", "2",
                 "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1"]) == 0
    report = (out / "data_report.txt").read_text()
    assert f"format {writer.split()[0]} (" in report and "data: 4 records" in report
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("loss" in h and torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert (out / "adapter_model.safetensors").is_file()
