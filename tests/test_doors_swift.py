"""ms-swift 3.x / 4.x ``swift rlhf`` command lines as its current examples write them (issue 24): every flag of
``examples/train/rlhf/*.sh``, the multimodal ``rlhf/`` scripts and ``packing/dpo.sh`` reaching its setting (or logged
as having no effect), ``--deepspeed zeroN``, ``--rlhf_type rm`` / ``kto``; the same aliases as YAML keys; suggestions
from the alias tables; one-step runs of lines in those scripts' shape on a tiny model."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from conftest import save_tiny_model

from preftune.aliases import apply_aliases
from preftune.aliases.base import Context
from preftune.aliases.deepspeed import ZERO_NAMES, convert_deepspeed, zero_config
from preftune.cli import main
from preftune.cli_args import TRAIN_GROUPS, _valid_names, parse_groups
from preftune.errors import ConfigError

VALID = _valid_names(TRAIN_GROUPS)
NAMES = ("model", "peft", "data", "loss", "engine", "training")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def parse(*argv):
    return dict(zip(NAMES, parse_groups(list(argv))))


def script(rlhf_type="dpo", tuner="lora", *extra):
    """A `swift rlhf` line in the shape of examples/train/rlhf/{dpo/lora,cpo,orpo,rm/train}.sh (model and data swapped)."""
    line = ["--rlhf_type", rlhf_type, "--model", "m", "--tuner_type", tuner, "--dataset", "d.jsonl",
            "--load_from_cache_file", "true", "--split_dataset_ratio", "0.01", "--torch_dtype", "float32",
            "--num_train_epochs", "1", "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
            "--learning_rate", "1e-4", "--gradient_accumulation_steps", "8", "--eval_steps", "100", "--save_steps",
            "100", "--save_total_limit", "2", "--logging_steps", "5", "--max_length", "2048", "--output_dir", "output",
            "--warmup_ratio", "0.05", "--dataloader_num_workers", "0", "--deepspeed", "zero2", "--dataset_num_proc", "4"]
    if tuner == "lora":
        line += ["--lora_rank", "8", "--lora_alpha", "32", "--target_modules", "all-linear"]
    return line + list(extra)


def test_current_example_flags_reach_their_settings(caplog, monkeypatch):
    monkeypatch.setattr("preftune.aliases.deepspeed.deepspeed_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="preftune.aliases"):
        g = parse(*script("dpo", "full", "--attn_impl", "flash_attn", "--rpo_alpha", "0.1",
                          "--freeze_vit", "false", "--freeze_aligner", "false", "--freeze_llm", "false",
                          "--packing", "true", "--truncation_strategy", "right", "--save_only_model", "true"))
    assert g["loss"].loss == "dpo" and g["loss"].rpo_alpha == 0.1 and not g["peft"].use_peft
    assert g["model"].dtype == "float32" and not g["model"].freeze_vision_tower
    assert g["data"].eval_ratio == 0.01 and g["data"].max_length == 2048 and g["data"].truncation_mode == "keep_start"
    assert g["engine"].padding_free and g["training"].deepspeed is None and g["training"].save_only_model
    assert g["training"].learning_rate == 1e-4 and g["training"].warmup_steps == 0.05
    lines = [r.getMessage() for r in caplog.records]
    for fragment in ("--load_from_cache_file true: ignored", "--dataset_num_proc 4: ignored",
                     "--deepspeed zero2: the deepspeed package is not installed here", "--freeze_vit false → "
                     "--freeze_vision_tower false", "--packing true → --padding_free true",
                     "--truncation_strategy right → --truncation_mode keep_start", "--freeze_llm false"):
        assert sum(fragment in line for line in lines) == 1, fragment
    assert any("--attn_impl flash_attn" in line for line in lines)  # what it fell back to, or flash_attention_2


def test_vision_flags_and_refusals():
    g = parse(*script("dpo", "lora", "--freeze_vit", "true", "--freeze_aligner", "true"))
    assert g["model"].freeze_vision_tower
    with pytest.raises(ConfigError, match="--freeze_aligner false with --freeze_vision_tower true"):
        parse(*script("dpo", "lora", "--freeze_vit", "true", "--freeze_aligner", "false"))
    with pytest.raises(ConfigError, match="--freeze_llm true: preftune always trains the language model"):
        parse(*script("dpo", "lora", "--freeze_llm", "true"))
    assert parse(*script("dpo", "lora", "--truncation_strategy", "delete"))["data"].truncation_mode == "keep_end"
    with pytest.raises(ConfigError, match="--truncation_strategy 'split'"):
        parse(*script("dpo", "lora", "--truncation_strategy", "split"))


def test_rlhf_type_rm_minimal_line_has_no_beta():
    """Before: the swift defaults injected --beta 0.1, which --loss rm refuses."""
    g = parse("--rlhf_type", "rm", "--model", "m", "--dataset", "d.jsonl")
    assert g["loss"].loss == "rm" and g["loss"].beta is None and g["peft"].lora_r == 8
    assert parse(*script("rm"))["loss"].loss == "rm"


def test_rlhf_type_kto_and_its_weights():
    g = parse(*script("kto", "lora", "--desirable_weight", "1.5"))
    assert g["loss"].loss == "kto" and g["loss"].beta == 0.1 and g["loss"].desirable_weight == 1.5


def test_mpo_loss_types_and_weights():
    g = parse(*script("dpo", "full", "--loss_type", "sigmoid", "bco_pair", "sft", "--loss_weights", "0.8", "0.2", "1.0",
                      "--rpo_alpha", "0.0", "--freeze_vit", "true", "--freeze_aligner", "true"))
    assert g["loss"].dpo_loss_type == ["sigmoid", "bco_pair", "sft"] and g["loss"].loss_weights == [0.8, 0.2, 1.0]


@pytest.mark.parametrize("name", ZERO_NAMES)
def test_deepspeed_names_write_their_configs(tmp_path, name, monkeypatch):
    monkeypatch.setattr("preftune.aliases.deepspeed.deepspeed_available", lambda: True)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    ctx = Context(valid=VALID, explicit={})
    tokens = convert_deepspeed("deepspeed", [name], ctx)
    written = json.loads(open(tokens[1]).read())
    assert tokens[0] == "--deepspeed" and written == zero_config(name)
    assert written["zero_optimization"]["stage"] == int(name[4]) and written["train_batch_size"] == "auto"
    offload = written["zero_optimization"].get("offload_optimizer", {}).get("device")
    assert offload == ("cpu" if name.endswith("offload") else None)
    assert ("offload_param" in written["zero_optimization"]) == (name == "zero3_offload")
    assert convert_deepspeed("deepspeed", ["my_ds.json"], ctx) == ["--deepspeed", "my_ds.json"]


def test_ppo_and_gkd_refused_in_one_line(capsys):
    for rlhf_type, extra in (("ppo", ["--reward_model", "r", "--response_length", "512"]),
                             ("gkd", ["--teacher_model", "t", "--lmbda", "0"])):
        assert main(["train", *script(rlhf_type, "full", *extra)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--rlhf_type {rlhf_type}: preftune does not train" in err and len(err.splitlines()) == 1


def test_yaml_keys_take_the_command_line_aliases(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": "m", "rlhf_type": "orpo", "lora_rank": 4, "warmup_ratio": 0.1,
                                   "evaluation_strategy": "steps", "train_type": "lora"}))
    g = parse(str(cfg))
    assert g["model"].model_name_or_path == "m" and g["loss"].loss == "orpo" and g["peft"].lora_r == 4
    assert g["training"].warmup_steps == 0.1 and g["training"].eval_strategy.value == "steps"
    g = parse(str(cfg), "--lora_rank", "2")  # the command line's alias wins over the YAML's
    assert g["peft"].lora_r == 2
    cfg.write_text(yaml.safe_dump({"overwrite_cache": True, "evaluation_strategy": "no"}))  # ALMA's keys
    assert parse(str(cfg))["loss"].loss == "cpo"  # ALMA's defaults, as on its command line


@pytest.mark.parametrize("argv, hint", [
    (["--lora_rnk", "8"], "did you mean --lora_rank?"),
    (["--load_from_cach_file", "true"], "did you mean --load_from_cache_file?"),
    (["--freeze_vitt", "true"], "did you mean --freeze_vit?"),
])
def test_suggestions_come_from_the_alias_tables(argv, hint):
    with pytest.raises(ConfigError, match=hint.replace("?", r"\?")):
        parse(*argv)


def test_yaml_suggestions_from_alias_tables(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_rnk: 8\n")
    with pytest.raises(ConfigError, match="unknown key 'lora_rnk'; did you mean 'lora_rank'"):
        parse(str(cfg))


def test_markers_make_it_a_swift_line():
    result = apply_aliases(["--dataset_num_proc", "4", "--model", "m"], VALID)
    assert result.tools == ["ms-swift"] and "--lora_r" in result.defaults


@pytest.fixture(scope="module")
def swift_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("swift-model"), layers=1, chat_template=CHAT_TEMPLATE)


def _swap(line, model, data, out):
    line = list(line)
    for flag, value in (("--model", model), ("--dataset", data), ("--output_dir", out)):
        line[line.index(flag) + 1] = value
    return line + ["--max_steps", "1", "--gradient_accumulation_steps", "1"]


def test_swift_lines_run_one_step(tmp_path, swift_model, monkeypatch):
    monkeypatch.setattr("preftune.aliases.deepspeed.deepspeed_available", lambda: False)
    pairs, kto = tmp_path / "pairs.jsonl", tmp_path / "kto.jsonl"
    pairs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q {i}"}, {
        "role": "assistant", "content": f"good {i}"}], "rejected_response": f"bad {i}"}) + "\n" for i in range(6)))
    kto.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q {i}"}, {
        "role": "assistant", "content": f"a {i}"}], "label": i % 2 == 0}) + "\n" for i in range(6)))
    for name, line, data in (("rm", script("rm"), pairs),
                             ("mpo", script("dpo", "full", "--loss_type", "sigmoid", "bco_pair", "sft", "--loss_weights",
                                            "0.8", "0.2", "1.0", "--freeze_vit", "true", "--freeze_aligner", "true",
                                            "--packing", "true", "--attn_impl", "flash_attn"), pairs),
                             ("kto", script("kto", "lora"), kto)):  # batch 1 as shipped
        out = tmp_path / name
        assert main(["train", *_swap(line, swift_model, str(data), str(out))]) == 0, name
        assert (out / ("adapter_config.json" if name != "mpo" else "config.json")).exists(), name
