"""Flags of ms-swift, the ORPO guide's script and ALMA (preftune.aliases): each mapping, the tools'
defaults, --help, and each seed's whole command line run as written (tiny model, small data in that
seed's format, --max_steps 2) to a saved adapter that reloads."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from preftune.aliases import HELP_TITLE, SWIFT2_DEFAULTS_RELEASE, SWIFT_DEFAULTS_RELEASE, apply_aliases
from preftune.cli import main
from preftune.cli_args import TRAIN_GROUPS, _valid_names, parse_groups
from preftune.config import ConfigError
from preftune.errors import ModelLoadError
from preftune.models.peft import resolve_target_modules

VALID = _valid_names(TRAIN_GROUPS)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SWIFT_SEED = ["--rlhf_type", "dpo", "--sft_type", "lora", "--lora_target_modules", "DEFAULT", "--batch_size", "1",
              "--rpo_alpha", "0.1"]


def parse(*argv):
    return dict(zip(("model", "peft", "data", "loss", "engine", "training"), parse_groups(list(argv))))


# ---- ms-swift -------------------------------------------------------------------------------------
def test_swift_seed_line_maps_and_gets_swift2_defaults(caplog):
    with caplog.at_level(logging.INFO, logger="preftune.aliases"):
        g = parse(*SWIFT_SEED, "--dataset", "d.jsonl#1000", "--model", "/models/m")
    assert g["model"].model_name_or_path == "/models/m"
    assert g["loss"].loss == "dpo" and g["peft"].use_peft and g["peft"].lora_target_modules == ["DEFAULT"]
    assert g["training"].per_device_train_batch_size == 1
    assert g["loss"].rpo_alpha == 0.1  # given: wins over swift 2.x's default 1.0
    # swift's defaults, not preftune's / TRL's
    assert g["peft"].lora_r == 8 and g["peft"].lora_alpha == 32
    assert g["training"].learning_rate == 1e-4 and g["training"].gradient_accumulation_steps == 16
    assert g["training"].weight_decay == 0.1 and g["training"].adam_beta2 == 0.95
    assert g["training"].lr_scheduler_type.value == "cosine" and g["training"].num_train_epochs == 1
    lines = [r.getMessage() for r in caplog.records]
    assert sum("--sft_type lora → --use_peft true" in line for line in lines) == 1
    assert sum("--rlhf_type dpo → --loss dpo" in line for line in lines) == 1
    assert sum("--batch_size 1 → --per_device_train_batch_size 1" in line for line in lines) == 1
    defaults = [line for line in lines if "ms-swift command line" in line]
    assert len(defaults) == 1 and f"swift {SWIFT2_DEFAULTS_RELEASE}" in defaults[0]
    assert "--rpo_alpha" not in defaults[0] and "--lora_r 8" in defaults[0]


def test_swift_current_release_defaults_and_explicit_flags_win(tmp_path, monkeypatch):
    g = parse("--rlhf_type", "dpo", "--train_type", "lora", "--model", "m")
    assert g["loss"].rpo_alpha is None  # swift >= 3.8: no SFT term unless asked
    assert g["peft"].lora_target_modules == ["all-linear"] and g["training"].per_device_eval_batch_size == 1
    assert g["training"].num_train_epochs == 3
    # a YAML value and a flag both win over swift's defaults
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 3.0e-5\n")
    g = dict(zip(("model", "peft", "data", "loss", "engine", "training"),
                 parse_groups([str(cfg), "--rlhf_type", "dpo", "--tuner_type", "lora", "--model", "m",
                               "--lora_r", "4", "--per_device_train_batch_size", "4"])))
    assert g["training"].learning_rate == 3e-5 and g["peft"].lora_r == 4
    assert g["training"].gradient_accumulation_steps == 4  # ceil(16 / 4): computed from the batch given
    # 4 processes (as under torchrun): swift divides its accumulation by the world size
    monkeypatch.setattr("preftune.aliases._world_size", lambda: 4)
    assert parse("--rlhf_type", "cpo", "--model", "m")["training"].gradient_accumulation_steps == 4
    # full fine-tuning: swift's full-parameter learning rate, no LoRA
    g = parse("--rlhf_type", "orpo", "--train_type", "full", "--model", "m")
    assert not g["peft"].use_peft and g["training"].learning_rate == 1e-5 and g["loss"].loss == "orpo"
    assert g["peft"].lora_r == 16  # preftune's default: swift's LoRA defaults are not applied to full
    # no --rlhf_type: swift rlhf's default is DPO
    assert parse("--train_type", "lora", "--model", "m")["loss"].loss == "dpo"


def test_swift_simpo_is_cpo_simpo_unless_cpo_alpha_is_zero():
    g = parse("--rlhf_type", "simpo", "--model", "m", "--train_type", "lora")
    assert (g["loss"].loss, g["loss"].beta, g["loss"].simpo_gamma, g["loss"].cpo_alpha) == ("cpo-simpo", 2.0, 1.0, 1.0)
    g = parse("--rlhf_type", "simpo", "--cpo_alpha", "0", "--beta", "2.5", "--model", "m")
    assert (g["loss"].loss, g["loss"].beta, g["loss"].cpo_alpha) == ("simpo", 2.5, 0.0)
    g = parse("--rlhf_type", "cpo", "--model", "m")
    assert (g["loss"].loss, g["loss"].beta, g["loss"].cpo_alpha) == ("cpo", 0.1, 1.0)


def test_swift_other_mappings(tmp_path):
    g = parse("--rlhf_type", "dpo", "--model", "m", "--lora_rank", "4", "--target_modules", "q_proj,v_proj",
              "--val_dataset", "v.jsonl", "--split_dataset_ratio", "0.1", "--torch_dtype", "bfloat16",
              "--attn_impl", "eager")
    assert g["peft"].lora_r == 4 and g["peft"].lora_target_modules == ["q_proj", "v_proj"]
    assert "v.jsonl" in str(g["data"].eval_file) and g["data"].eval_ratio == 0.1
    assert g["model"].dtype == "bfloat16" and g["model"].attn_implementation == "eager"
    g = parse("--sft_type", "lora", "--model_id_or_path", "m", "--dataset_test_ratio", "0.2", "--lora_dropout_p", "0.1",
              "--eval_batch_size", "3")
    assert g["model"].model_name_or_path == "m" and g["data"].eval_ratio == 0.2 and g["peft"].lora_dropout == 0.1
    assert g["training"].per_device_eval_batch_size == 3
    assert g["peft"].lora_target_modules == ["DEFAULT"] and g["loss"].rpo_alpha == 1.0  # swift 2.x defaults
    assert parse("--quantization_bit", "4", "--model", "m")["peft"].load_in_4bit


def test_swift_errors():
    with pytest.raises(ConfigError, match=r"--model_type qwen2-7b-instruct.*--model PATH"):
        parse("--rlhf_type", "dpo", "--model_type", "qwen2-7b-instruct")
    g = parse("--rlhf_type", "dpo", "--model_type", "qwen2", "--model", "m")  # with a path: ignored
    assert g["model"].model_name_or_path == "m"
    with pytest.raises(ConfigError, match=r"--rlhf_type ppo: preftune does not train PPO.*dpo, cpo, orpo, simpo, rm"):
        parse("--rlhf_type", "ppo", "--model", "m")
    with pytest.raises(ConfigError, match=r"--sft_type adalora: preftune trains LoRA"):
        parse("--sft_type", "adalora", "--model", "m")
    with pytest.raises(ConfigError, match=r"mixes the flags of ms-swift \(--rlhf_type\) and ORPO script"):
        parse("--rlhf_type", "dpo", "--train_file", "d.json")
    assert main(["train", "--rlhf_type", "grpo"]) == 2


def test_rlhf_type_rm_maps_to_the_reward_loss():
    assert apply_aliases(["--rlhf_type", "rm"], VALID).argv == ["--loss", "rm"]


def test_alias_yields_to_a_real_flag_of_the_same_name():
    result = apply_aliases(["--model", "x", "--batch_size", "2"], VALID | {"model"})
    assert result.argv == ["--model", "x", "--per_device_train_batch_size", "2"]
    # an alias whose target is not in these groups is left for the unknown-flag check
    assert apply_aliases(["--sft_type", "lora"], {"loss"}).argv == ["--sft_type", "lora"]
    # preftune's own flag wins over an alias of it
    result = apply_aliases(["--max_source_length", "200", "--max_prompt_length", "100"], VALID)
    assert result.argv == ["--max_prompt_length", "100"]
    assert any("--max_source_length 200: not used, --max_prompt_length 100 is given" in n for n in result.notes)


# ---- the ORPO guide ----------------------------------------------------------------------------
def test_orpo_script_flags_and_defaults(monkeypatch):
    g = parse("--model_name_or_path", "m", "--train_file", "data.json", "--lora_target_modules",
              "q_proj,v_proj,k_proj,o_proj,gate_proj,up_proj,down_proj", "--use_flash_attention", "True")
    assert "data.json" in str(g["data"].dataset)
    assert g["peft"].lora_target_modules == ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # the script's defaults: ORPO with LoRA, 5 % held out, its lengths
    assert g["loss"].loss == "orpo" and g["peft"].use_peft and g["data"].eval_ratio == 0.05
    assert (g["data"].max_length, g["data"].max_prompt_length) == (2048, 1024)
    have_flash = importlib.util.find_spec("flash_attn") is not None
    assert g["model"].attn_implementation == ("flash_attention_2" if have_flash else "sdpa")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert apply_aliases(["--use_flash_attention", "True"], VALID).argv == ["--attn_implementation", "flash_attention_2"]
    assert apply_aliases(["--use_flash_attention", "false"], VALID).argv == []
    g = parse("--train_file", "d.json", "--eval_file", "e.json", "--use_4bit", "True", "--loss", "cpo")
    assert g["peft"].load_in_4bit and g["peft"].use_peft and g["data"].eval_ratio == 0.0 and g["loss"].loss == "cpo"
    g = parse("--train_file", "d.json", "--use_8bit", "True")  # 8-bit base weights (bitsandbytes) + LoRA
    assert g["peft"].load_in_8bit and g["peft"].use_peft and not g["peft"].load_in_4bit
    with pytest.raises(ConfigError, match="--use_4bit maybe: expected true or false"):
        parse("--train_file", "d.json", "--use_4bit", "maybe")


# ---- ALMA ------------------------------------------------------------------------------------------
ALMA_IGNORED = ("use_fast_tokenizer", "low_cpu_mem_usage", "ignore_pad_token_for_loss", "ignore_prompt_token_for_loss",
                "max_new_tokens", "overwrite_cache", "do_train", "prediction_loss_only")


def test_alma_flags(caplog):
    with caplog.at_level(logging.INFO, logger="preftune.aliases"):
        g = parse("--model_name_or_path", "m", "--tokenizer_name", "t", "--cpo_data_path", "haoranxu/ALMA-R-Preference",
                  "--use_fast_tokenizer", "False", "--do_train", "--low_cpu_mem_usage", "--ignore_pad_token_for_loss",
                  "--ignore_prompt_token_for_loss", "--evaluation_strategy", "no", "--prediction_loss_only",
                  "--max_new_tokens", "256", "--max_source_length", "256", "--max_length", "512", "--overwrite_cache",
                  "--warmup_ratio", "0.01", "--bf16")
    assert g["model"].tokenizer_name_or_path == "t" and "haoranxu/ALMA-R-Preference" in str(g["data"].dataset)
    assert g["training"].eval_strategy.value == "no" and g["data"].max_prompt_length == 256
    assert g["training"].warmup_steps == 0.01 and g["training"].bf16 and g["loss"].loss == "cpo"
    lines = [r.getMessage() for r in caplog.records]
    for flag in ALMA_IGNORED:
        assert sum(f"--{flag}" in line and "ignored: " in line for line in lines) == 1, flag
    assert parse("--mmt_data_path", "human_written_data/")["data"].dataset
    with pytest.raises(ConfigError, match="--max_source_length needs a value"):
        parse("--max_source_length")


def test_help_lists_the_aliases(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert HELP_TITLE in text and f"ms-swift {SWIFT_DEFAULTS_RELEASE}" in text
    for flag in ("--rlhf_type", "--sft_type", "--train_type", "--model", "--batch_size", "--lora_rank", "--val_dataset",
                 "--split_dataset_ratio", "--model_type", "--train_file", "--use_4bit", "--use_8bit",
                 "--use_flash_attention", "--cpo_data_path", "--mmt_data_path", "--tokenizer_name",
                 "--use_fast_tokenizer", "--evaluation_strategy", "--max_source_length", "--max_new_tokens",
                 "--overwrite_cache", "--ignore_prompt_token_for_loss", "--low_cpu_mem_usage"):
        assert f"  {flag} " in text, flag
    aliases_part = text[text.index(HELP_TITLE):]
    assert "[ms-swift]" in aliases_part and "[ORPO script]" in aliases_part and "[ALMA]" in aliases_part


# ---- LoRA targets -------------------------------------------------------------------------------------
def test_resolve_target_modules():
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = tiny_llama(layers=1)
    assert resolve_target_modules(llama, ["DEFAULT"]) == ["k_proj", "q_proj", "v_proj"]
    assert resolve_target_modules(llama, ["DEFAULT", "o_proj", "q_proj"]) == ["k_proj", "q_proj", "v_proj", "o_proj"]
    assert resolve_target_modules(llama, ["ALL"]) == "all-linear" == resolve_target_modules(llama, ["all-linear"])
    assert resolve_target_modules(llama, ["up_proj"]) == ["up_proj"]
    with pytest.raises(ModelLoadError, match="cannot be combined"):
        resolve_target_modules(llama, ["ALL", "q_proj"])
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    assert resolve_target_modules(gpt2, ["DEFAULT"]) == ["c_attn"]
    with pytest.raises(ModelLoadError, match="found no attention projection layers in Linear"):
        resolve_target_modules(torch.nn.Linear(2, 2), ["DEFAULT"])


# ---- each seed's whole command line, as written ------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny Llama and a byte tokenizer with a chat template (the swift / ShareGPT data are conversations)."""
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    model = tiny_llama(vocab_size=len(tok), layers=2)
    model.config.max_position_embeddings = 2048
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def reload_adapter(model_dir, adapter_dir):
    """The saved adapter on a fresh copy of the base model; returns (its config, its LoRA B weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    lora_b = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    return peft_model.peft_config["default"], lora_b


def write_jsonl(path, records):
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def swift2_records(n):
    """ms-swift 2.x preference records (system, history, query, response, rejected_response)."""
    out = []
    for i in range(n):
        record = {"query": f"What is {i} + {i}?", "response": f"{2 * i}.", "rejected_response": f"{2 * i + 1}, maybe.",
                  "history": [["Hi", "Hello! Ask me a sum."]] if i % 2 else []}
        if i % 3 == 0:
            record["system"] = "You answer sums."
        out.append(record)
    return out


def test_swift_seed_command_line_runs_as_written(chat_model_dir, tmp_path, caplog):
    data = write_jsonl(tmp_path / "swift.jsonl", swift2_records(6))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = main(["train", *SWIFT_SEED, "--dataset", f"{data}#1000", "--model", chat_model_dir,
                     "--output_dir", str(out), "--max_steps", "2"])
    assert code == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any("swift2" in line for line in lines), "the data report names the swift 2.x format"
    config, lora_b = reload_adapter(chat_model_dir, out)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj"}  # DEFAULT, as swift 2.x for Llama
    assert config.r == 8 and config.lora_alpha == 32  # swift's LoRA defaults
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b.values()), "the adapter was trained"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    resolved = (out / "preftune_config.yaml").read_text()
    assert "loss: dpo" in resolved and "rpo_alpha: 0.1" in resolved


def sharegpt_records(n):
    """The ORPO guide's data format: ShareGPT conversations (system + human) and gpt chosen / rejected objects."""
    return [{"conversations": [{"from": "system", "value": "You are an AI assistant. Think step by step."},
                               {"from": "human", "value": f"Name the number after {i}."}],
             "chosen": {"from": "gpt", "value": f"It is {i + 1}."},
             "rejected": {"from": "gpt", "value": f"Maybe {i - 1}?"}} for i in range(n)]


def orpo_guide_line(model_dir, data, out, *extra):
    """The ORPO guide's basic training command (accelerate launch src/orpo/train.py ...), paths replaced."""
    return ["--model_name_or_path", model_dir, "--train_file", data, "--eval_ratio", "0.05", "--output_dir", str(out),
            "--beta", "0.1", "--max_length", "2048", "--max_prompt_length", "1024", "--lora_r", "16",
            "--lora_alpha", "32", "--lora_dropout", "0.05", "--lora_target_modules",
            "q_proj,v_proj,k_proj,o_proj,gate_proj,up_proj,down_proj", "--use_flash_attention", "True",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4", "--learning_rate", "5e-5",
            "--num_train_epochs", "3", *extra]


def test_orpo_guide_command_line_runs_as_written(chat_model_dir, tmp_path, caplog):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(sharegpt_records(20), ensure_ascii=False), encoding="utf-8")
    out, adapters = tmp_path / "orpo_output", tmp_path / "lora_adapters" / "my_model"
    with caplog.at_level(logging.INFO):
        code = main(["train", *orpo_guide_line(chat_model_dir, str(data), out, "--lora_adapter_dir", str(adapters),
                                               "--max_steps", "2")])
    assert code == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any("sharegpt" in line for line in lines)
    if importlib.util.find_spec("flash_attn") is None:
        assert any("flash-attn package is not installed" in line for line in lines)
    targets = {"q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for where in (out, adapters):  # the adapter is written to --output_dir and to --lora_adapter_dir
        config, lora_b = reload_adapter(chat_model_dir, where)
        assert set(config.target_modules) == targets and config.r == 16
        assert any(p.abs().sum() > 0 for p in lora_b.values())
    resolved = (out / "preftune_config.yaml").read_text()
    assert "loss: orpo" in resolved and "eval_ratio: 0.05" in resolved
    assert "eval_loss" in json.loads((out / "eval_results.json").read_text())  # the 5 % held out was evaluated


def test_orpo_guide_quantised_command_line(chat_model_dir, tmp_path, capsys):
    """The guide's QLoRA example (--use_4bit True): trains where CUDA and bitsandbytes exist, else one clear error."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(sharegpt_records(20)), encoding="utf-8")
    argv = ["train", "--model_name_or_path", chat_model_dir, "--train_file", str(data), "--eval_ratio", "0.05",
            "--output_dir", str(tmp_path / "out"), "--use_4bit", "True", "--beta", "0.1", "--lora_r", "16",
            "--use_flash_attention", "True", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
            "--learning_rate", "5e-5", "--max_steps", "2"]
    if importlib.util.find_spec("bitsandbytes") is not None:  # bitsandbytes runs 4-bit on CPU too
        assert main(argv) == 0
        reload_adapter(chat_model_dir, tmp_path / "out")
    else:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--load_in_4bit" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def alma_triplet(i, pair):
    """One ALMA-R-Preference record (translation dict with gpt4 / alma candidates and kiwi_xcomet scores)."""
    src, tgt = pair.split("-")
    tr = {"language_pair": pair, src: f"Satz {i}.", tgt: f"Sentence {i}."}
    for lang, base in ((tgt, "Sentence"), (src, "Satz")):
        tr[f"gpt4_{lang}"], tr[f"alma_{lang}"] = f"{base} number {i}.", f"{base} {i} maybe."
        tr[f"ref_{lang}_kiwi_xcomet"], tr[f"gpt4_{lang}_kiwi_xcomet"], tr[f"alma_{lang}_kiwi_xcomet"] = 0.9, 0.8, 0.3
    return {"translation": tr}


def test_alma_cpo_ft_command_line_runs_as_written(tmp_path, caplog):
    """ALMA's runs/cpo_ft.sh, every flag as written: model, tokenizer, adapter and data paths replaced."""
    from peft import LoraConfig, get_peft_model

    model_dir, tok_dir, lora_dir = tmp_path / "ALMA-Pretrain", tmp_path / "ALMA-tokenizer", tmp_path / "ALMA-LoRA"
    tok = byte_tokenizer()
    base = tiny_llama(vocab_size=len(tok), layers=2)
    base.config.max_position_embeddings = 2048
    base.save_pretrained(model_dir)  # no tokenizer here: --tokenizer_name must be used
    tok.save_pretrained(tok_dir)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(lora_dir)
    data = write_jsonl(tmp_path / "alma_r.jsonl", [alma_triplet(i, p) for i in range(4) for p in ("de-en", "cs-en")])
    pairs = "de-en,cs-en,is-en,zh-en,ru-en,en-de,en-cs,en-is,en-zh,en-ru"
    out = tmp_path / "alma-7b-dpo-ft"
    argv = ["--model_name_or_path", str(model_dir), "--tokenizer_name", str(tok_dir), "--peft_model_id", str(lora_dir),
            "--cpo_scorer", "kiwi_xcomet", "--beta", "0.1", "--use_peft", "--use_fast_tokenizer", "False",
            "--cpo_data_path", data, "--do_train", "--language_pairs", pairs, "--low_cpu_mem_usage", "--bf16",
            "--learning_rate", "1e-4", "--weight_decay", "0.01", "--gradient_accumulation_steps", "1",
            "--lr_scheduler_type", "inverse_sqrt", "--warmup_ratio", "0.01", "--ignore_pad_token_for_loss",
            "--ignore_prompt_token_for_loss", "--per_device_train_batch_size", "2", "--evaluation_strategy", "no",
            "--save_strategy", "steps", "--save_total_limit", "1", "--logging_strategy", "steps",
            "--logging_steps", "0.05", "--output_dir", str(out), "--num_train_epochs", "1", "--prediction_loss_only",
            "--max_new_tokens", "256", "--max_source_length", "256", "--max_prompt_length", "256",
            "--max_length", "512", "--seed", "42", "--overwrite_output_dir", "--report_to", "none",
            "--overwrite_cache"]
    with caplog.at_level(logging.INFO):
        assert main(["train", *argv, "--max_steps", "2"]) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any("ALMA command line" in line and "--loss cpo" in line for line in lines)
    config, lora_b = reload_adapter(str(model_dir), out)
    assert config.r == 4 and set(config.target_modules) == {"q_proj", "v_proj"}  # the continued adapter
    start = dict(reload_adapter(str(model_dir), lora_dir)[1])
    assert any(not torch.equal(p, start[n]) for n, p in lora_b.items()), "training moved the continued adapter"
    resolved = (out / "preftune_config.yaml").read_text()
    assert f"tokenizer_name_or_path: {tok_dir}" in resolved and "loss: cpo" in resolved
