"""LLaMA-Factory's configs as doors (issue 24): classic and v1 YAMLs written here in the shape LLaMA-Factory
documents (``examples/train_lora/*``, ``examples/v1/train_lora/train_lora_dpo.yaml``), a ``dataset_info.json`` with
entries shaped like its demo sets; each key reaching the setting it names, the refusals in one line, and
one-step runs on a tiny model."""

from __future__ import annotations

import json
import logging
import re

import pytest
import yaml
from conftest import save_tiny_model

from preftune.cli import main
from preftune.cli_args import parse_groups
from preftune.data.loading import load_raw
from preftune.errors import ConfigError, DataError

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
NAMES = ("model", "peft", "data", "loss", "engine", "training")


@pytest.fixture(scope="module")
def lf_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("lf-model"), layers=1, chat_template=CHAT_TEMPLATE)


def _write(path, obj):
    path.write_text(json.dumps(obj, indent=1))
    return path


@pytest.fixture
def data_dir(tmp_path):
    """A dataset_dir as LLaMA-Factory ships it: dpo_en_demo (ShareGPT ranking), kto_en_demo (role/content
    tags, kto_tag column), an Alpaca ranking set with renamed columns, a Hub-only and a ModelScope-only entry."""
    d = tmp_path / "data"
    d.mkdir()
    _write(d / "dpo_en_demo.json", [{"conversations": [{"from": "human", "value": f"question {i}?"}],
                                     "chosen": {"from": "gpt", "value": f"a good answer {i}"},
                                     "rejected": {"from": "gpt", "value": f"bad {i}"}} for i in range(6)])
    _write(d / "kto_en_demo.json", [{"messages": [{"role": "user", "content": f"q {i}"},
                                                  {"role": "assistant", "content": f"reply {i}"}],
                                     "label": i % 2 == 0} for i in range(6)])
    _write(d / "ranked.json", [{"question": f"task {i}", "context": "ctx" if i else "", "good": f"yes {i}",
                                "bad": f"no {i}", "sys": "be brief"} for i in range(5)])
    _write(d / "dataset_info.json", {
        "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                        "columns": {"messages": "messages", "kto_tag": "label"},
                        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant"}},
        "ranked": {"file_name": "ranked.json", "ranking": True,
                   "columns": {"prompt": "question", "query": "context", "chosen": "good", "rejected": "bad"}},
        "sampled": {"file_name": "ranked.json", "ranking": True, "num_samples": 8,
                    "columns": {"prompt": "question", "chosen": "good", "rejected": "bad", "system": "sys"}},
        "dpo_mix_en": {"hf_hub_url": "llamafactory/DPO-En-Zh-20k", "subset": "en", "ranking": True,
                       "formatting": "sharegpt"},
        "ultrafeedback": {"hf_hub_url": "llamafactory/ultrafeedback_binarized", "ranking": True},
        "ms_only": {"ms_hub_url": "AI-ModelScope/x", "ranking": True},
        "alpaca_en_demo": {"file_name": "ranked.json"},
    })
    return d


def _config(tmp_path, data_dir, model="m", **keys):
    """A classic config in the shape of LLaMA-Factory's examples/train_lora/qwen3_lora_dpo.yaml."""
    config = {"model_name_or_path": model, "trust_remote_code": True, "stage": "dpo", "do_train": True,
              "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "pref_beta": 0.1,
              "pref_loss": "sigmoid", "dataset": "dpo_en_demo", "dataset_dir": str(data_dir),
              "template": "qwen3_nothink", "cutoff_len": 2048, "max_samples": 1000, "preprocessing_num_workers": 16,
              "dataloader_num_workers": 0, "output_dir": str(tmp_path / "out"), "logging_steps": 10,
              "save_steps": 500, "plot_loss": True, "overwrite_output_dir": True, "save_only_model": False,
              "report_to": "none", "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
              "learning_rate": 5.0e-6, "num_train_epochs": 3.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1,
              "ddp_timeout": 180000000, "resume_from_checkpoint": None}
    for key, value in keys.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def parse(*argv):
    return dict(zip(NAMES, parse_groups(list(argv))))


def test_classic_dpo_config_every_key_reaches_its_setting(tmp_path, data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="preftune.aliases"):
        g = parse(_config(tmp_path, data_dir, val_size=0.25, eval_strategy="steps", eval_steps=5))
    assert g["model"].model_name_or_path == "m" and g["model"].trust_remote_code
    assert g["loss"].loss == "dpo" and g["loss"].dpo_loss_type == "sigmoid" and g["loss"].beta == 0.1
    assert g["peft"].use_peft and g["peft"].lora_r == 8 and g["peft"].lora_alpha == 16  # LLaMA-Factory: 2 x rank
    assert g["peft"].lora_dropout == 0.0 and g["peft"].lora_target_modules == ["all-linear"]
    assert g["data"].max_length == 2048 and g["data"].max_prompt_length == 1024 and g["data"].eval_ratio == 0.25
    assert g["data"].dataset == [f"{data_dir}/dataset_info.json::dpo_en_demo#1000"]
    assert g["data"].dataset_format == ["sharegpt"]
    t = g["training"]
    assert t.learning_rate == 5e-6 and t.per_device_train_batch_size == 1 and t.gradient_accumulation_steps == 8
    assert t.warmup_steps == 0.1 and t.lr_scheduler_type.value == "cosine" and t.save_steps == 500
    assert t.overwrite_output_dir and t.output_dir == str(tmp_path / "out") and t.eval_steps == 5
    lines = [r.getMessage() for r in caplog.records]
    for line in ("stage dpo, pref_loss sigmoid → --loss dpo", "lora_rank → --lora_r 8", "cutoff_len → --max_length 2048",
                 "template qwen3_nothink: ignored", "plot_loss true: ignored", "warmup_ratio 0.1 → --warmup_steps 0.1",
                 "dataset dpo_en_demo:"):
        assert sum(line in x for x in lines) == 1, line


def test_defaults_are_llamafactorys_and_flags_win(tmp_path, data_dir):
    g = parse(_config(tmp_path, data_dir, lora_rank=..., learning_rate=..., logging_steps=..., cutoff_len=...,
                      pref_beta=..., pref_loss=..., lora_target=...), "--lora_r", "4")
    assert g["peft"].lora_r == 4 and g["peft"].lora_alpha == 16  # alpha from LLaMA-Factory's rank 8; the flag wins
    assert g["training"].learning_rate == 5e-5 and g["training"].logging_steps == 500  # transformers' defaults
    assert g["data"].max_length == 2048 and g["loss"].beta == 0.1 and g["loss"].loss == "dpo"
    full = parse(_config(tmp_path, data_dir, finetuning_type="full"))
    assert not full["peft"].use_peft


@pytest.mark.parametrize("keys, expect", [
    ({"pref_loss": "hinge"}, {"loss": "dpo", "dpo_loss_type": "hinge", "beta": 0.1}),
    ({"pref_loss": "ipo", "pref_beta": 0.3}, {"loss": "dpo", "dpo_loss_type": "ipo", "beta": 0.3}),
    ({"pref_ftx": 0.5}, {"loss": "dpo", "rpo_alpha": 0.5}),
    ({"pref_bco_weight": 1.0}, {"dpo_loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.5, 0.5]}),
    ({"dpo_label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    ({"pref_loss": "orpo", "pref_beta": 0.2}, {"loss": "orpo", "beta": 0.2}),
    ({"pref_loss": "simpo", "simpo_gamma": 0.7}, {"loss": "simpo", "beta": 0.1, "simpo_gamma": 0.7, "cpo_alpha": 0.0}),
    ({"pref_loss": "simpo", "pref_ftx": 1.0}, {"loss": "simpo", "cpo_alpha": 1.0}),
    ({"stage": "kto", "kto_chosen_weight": 1.5, "kto_rejected_weight": 0.5, "pref_loss": ...},
     {"loss": "kto", "beta": 0.1, "desirable_weight": 1.5, "undesirable_weight": 0.5}),
    ({"stage": "rm", "pref_beta": ..., "pref_loss": ...}, {"loss": "rm", "beta": None}),
    ({"stage": "orpo", "orpo_beta": 0.05, "pref_loss": ..., "pref_beta": ...}, {"loss": "orpo", "beta": 0.05}),
])
def test_preference_keys_reach_the_loss(tmp_path, data_dir, keys, expect):
    loss = parse(_config(tmp_path, data_dir, **keys))["loss"]
    for name, value in expect.items():
        assert getattr(loss, name) == value, name


def test_ld_alpha_reaches_ld_alpha(tmp_path, data_dir):
    from preftune.cli_args import TRAIN_GROUPS, _valid_names

    if "ld_alpha" not in _valid_names(TRAIN_GROUPS):
        pytest.skip("--ld_alpha (LD-DPO) is not in this preftune yet (being added by another change)")
    assert parse(_config(tmp_path, data_dir, ld_alpha=0.5))["loss"].ld_alpha == 0.5


def test_model_side_keys(tmp_path, data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="preftune.aliases"):
        g = parse(_config(tmp_path, data_dir, lora_target="q_proj,v_proj", lora_alpha=32, lora_dropout=0.1,
                          flash_attn="fa2", freeze_vision_tower=False, freeze_multi_modal_projector=False,
                          image_max_pixels=262144, video_max_pixels=16384, moe_aux_loss_coef=0.01))
    assert g["peft"].lora_target_modules == ["q_proj", "v_proj"] and g["peft"].lora_alpha == 32
    assert g["peft"].lora_dropout == 0.1 and not g["model"].freeze_vision_tower
    assert g["loss"].router_aux_loss_coef == 0.01
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "image_max_pixels 262144: ignored" in text and "video_max_pixels 16384: ignored" in text
    assert "flash_attn fa2" in text  # flash-attn installed or not, one line says which kernel runs


@pytest.mark.parametrize("keys, message", [
    ({"stage": "ppo", "reward_model": "rm"}, "stage ppo: PPO"),
    ({"stage": "sft"}, "stage sft: supervised fine-tuning"),
    ({"stage": "pt"}, "stage pt"),
    ({"stage": ...}, "stage sft (LLaMA-Factory's default"),
    ({"reward_model": "some/rm"}, "reward_model: 'some/rm': a reward model for PPO"),
    ({"finetuning_type": "freeze"}, "finetuning_type freeze"),
    ({"deepspeed": "examples/deepspeed/ds_z3_config.json"}, "the deepspeed package is not installed"),
    ({"pref_loss": "kto_pair"}, "pref_loss 'kto_pair'"),
    ({"val_size": 100}, "val_size 100: a count"),
    ({"dataset": "nope_demo"}, "no data set 'nope_demo'"),
    ({"dataset": "ms_only"}, "ModelScope"),
    ({"dataset": "alpaca_en_demo"}, "not preference data"),
    ({"model_name_or_path": ...}, "names no model (model_name_or_path)"),
    ({"dataset": ...}, "no dataset"),
    ({"lora_rnk": 8}, "unknown key 'lora_rnk' in this LLaMA-Factory config; did you mean 'lora_rank'?"),
    ({"use_dora": True}, "DoRA is not supported"),
])
def test_refused_in_one_line_exit_2(tmp_path, data_dir, capsys, keys, message, monkeypatch):
    monkeypatch.setattr("preftune.aliases.deepspeed.deepspeed_available", lambda: False)
    monkeypatch.setattr("preftune.aliases.lf_common.deepspeed_available", lambda: False)
    assert main(["train", _config(tmp_path, data_dir, **keys)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_dataset_dir_on_the_command_line(data_dir):
    g = parse("--dataset", "dpo_en_demo#3", str(data_dir / "ranked.json"), "--dataset_dir", str(data_dir),
              "--eval_file", "kto_en_demo", "--model", "m", "--loss", "dpo")
    assert g["data"].dataset == [f"{data_dir}/dataset_info.json::dpo_en_demo#3", str(data_dir / "ranked.json")]
    assert g["data"].eval_file == [f"{data_dir}/dataset_info.json::kto_en_demo"]
    with pytest.raises(ConfigError, match="no data set 'dpo_en_dem' in it; did you mean 'dpo_en_demo'"):
        parse("--dataset", "dpo_en_dem", "--dataset_dir", str(data_dir))


def test_hub_entry_offline_is_a_clear_error(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="ultrafeedback: hf_hub_url 'llamafactory/ultrafeedback_binarized' is on "
                                          "the Hugging Face Hub and this run is offline"):
        parse(_config(tmp_path, data_dir, dataset="ultrafeedback"))


def test_hub_entry_with_subset_from_a_local_snapshot(tmp_path, data_dir, monkeypatch):
    """dpo_mix_en (hf_hub_url + subset en) loads by name from a snapshot of the Hub repository kept in dataset_dir,
    offline; without the snapshot, offline is one clear line."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="dpo_mix_en: hf_hub_url 'llamafactory/DPO-En-Zh-20k' is on the Hugging Face"):
        parse(_config(tmp_path, data_dir, dataset="dpo_mix_en"))
    snap = data_dir / "llamafactory" / "DPO-En-Zh-20k"
    snap.mkdir(parents=True)
    rows = json.loads((data_dir / "dpo_en_demo.json").read_text())
    _write(snap / "dpo_en.json", rows[:4])
    _write(snap / "dpo_zh.json", rows[4:])
    (snap / "README.md").write_text("---\nconfigs:\n- config_name: en\n  data_files: dpo_en.json\n"
                                    "- config_name: zh\n  data_files: dpo_zh.json\n---\n")
    g = parse(_config(tmp_path, data_dir, dataset="dpo_mix_en"))
    raw = load_raw(g["data"].dataset[0])
    assert len(raw.records) == 4 and raw.records[0]["conversations"] == [{"from": "human", "value": "question 0?"}]


def test_dataset_info_columns_tags_and_samples(data_dir):
    info = data_dir / "dataset_info.json"
    ranked = load_raw(f"{info}::ranked")
    assert ranked.records[0] == {"instruction": "task 0", "chosen": "yes 0", "rejected": "no 0"}  # no sys: not mapped
    assert ranked.records[1]["input"] == "ctx" and ranked.base_dir == str(data_dir)
    kto = load_raw(f"{info}::kto_en_demo#4")
    assert len(kto.records) == 4 and kto.records[0] == {
        "conversations": [{"from": "human", "value": "q 0"}, {"from": "gpt", "value": "reply 0"}], "label": True}
    sampled = load_raw(f"{info}::sampled", seed=3)  # num_samples 8 of 5 records: every record, then 3 drawn
    assert len(sampled.records) == 8 and sampled.records[0]["system"] == "be brief"
    assert {r["instruction"] for r in sampled.records} == {f"task {i}" for i in range(5)}
    assert sampled.records == load_raw(f"{info}::sampled", seed=3).records
    folder = data_dir / "parts"
    folder.mkdir()
    for i in range(2):
        _write(folder / f"p{i}.json", [{"conversations": [{"from": "human", "value": f"h{i}"}], "chosen": "c",
                                        "rejected": "r"}])
    info.write_text(json.dumps({"parts": {"file_name": "parts", "ranking": True, "formatting": "sharegpt"}}))
    assert [r["conversations"][0]["value"] for r in load_raw(f"{info}::parts").records] == ["h0", "h1"]


def test_sharegpt_tags_outside_the_entry_are_named(tmp_path):
    _write(tmp_path / "d.json", [{"messages": [{"role": "human", "content": "x"}], "chosen": "c", "rejected": "r"}])
    _write(tmp_path / "dataset_info.json", {"d": {"file_name": "d.json", "ranking": True, "formatting": "sharegpt",
                                                  "columns": {"messages": "messages"},
                                                  "tags": {"role_tag": "role", "content_tag": "content",
                                                           "user_tag": "user", "assistant_tag": "assistant"}}})
    with pytest.raises(DataError, match=r"record 1: messages\[0\]: role 'human' is not one of this entry's tags"):
        load_raw(f"{tmp_path}/dataset_info.json::d")


def test_classic_dpo_eval_and_rm_run_one_step(tmp_path, data_dir, lf_model, caplog):
    cfg = _config(tmp_path, data_dir, model=lf_model, eval_dataset="dpo_en_demo", eval_strategy="steps",
                  eval_steps=1, gradient_accumulation_steps=1, max_steps=1, cutoff_len=256)
    with caplog.at_level(logging.INFO, logger="preftune.data"):
        assert main(["train", cfg]) == 0
    assert (tmp_path / "out" / "adapter_config.json").exists()
    assert any("dpo_en_demo" in r.getMessage() and "format sharegpt" in r.getMessage() for r in caplog.records)
    rm = _config(tmp_path, data_dir, model=lf_model, stage="rm", pref_beta=..., pref_loss=..., max_steps=1,
                 gradient_accumulation_steps=1, cutoff_len=256, output_dir=str(tmp_path / "rm"))
    assert main(["train", rm]) == 0 and (tmp_path / "rm" / "adapter_config.json").exists()


def test_classic_kto_runs_one_step(tmp_path, data_dir, lf_model):
    cfg = _config(tmp_path, data_dir, model=lf_model, stage="kto", dataset="kto_en_demo", pref_loss=..., max_steps=1,
                  gradient_accumulation_steps=1, per_device_train_batch_size=1, cutoff_len=256)  # as shipped
    assert main(["train", cfg]) == 0 and (tmp_path / "out" / "adapter_config.json").exists()


def _v1_record(i):
    def msg(role, text, weight):
        return {"role": role, "content": [{"type": "text", "value": text}], "loss_weight": weight}

    prompt = [msg("system", "You are helpful.", 0.0), msg("user", f"Translate {i}", 0.0)]
    return {"chosen_messages": prompt + [msg("assistant", f"good {i}", 1.0)],
            "rejected_messages": prompt + [msg("assistant", f"bad {i}", 1.0)]}


def test_v1_config_keys_data_and_one_step(tmp_path, lf_model, caplog):
    data = tmp_path / "v1_dpo_demo.jsonl"
    data.write_text("".join(json.dumps(_v1_record(i)) + "\n" for i in range(4)))
    cfg = tmp_path / "v1.yaml"  # the shape of LLaMA-Factory's examples/v1/train_lora/train_lora_dpo.yaml
    cfg.write_text(yaml.safe_dump({
        "model": lf_model, "model_class": "llm",
        "peft_config": {"name": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all"},
        "kernel_config": {"name": "auto"}, "dist_config": {"name": "fsdp2", "dcp_path": None},
        "train_dataset": str(data), "output_dir": str(tmp_path / "v1out"), "micro_batch_size": 1,
        "global_batch_size": 2, "cutoff_len": 256, "learning_rate": 1.0e-5, "max_steps": 1, "bf16": False,
        "sample_backend": "hf", "max_new_tokens": 128}))
    g = parse(str(cfg))
    assert g["model"].model_name_or_path == lf_model and g["peft"].use_peft and g["peft"].lora_r == 16
    assert g["peft"].lora_alpha == 32 and g["peft"].lora_target_modules == ["all-linear"]
    assert g["loss"].loss == "dpo" and g["training"].per_device_train_batch_size == 1
    assert g["training"].gradient_accumulation_steps == 2 and g["training"].learning_rate == 1e-5
    assert g["data"].dataset == [f"{data}::llamafactory_v1"] and g["data"].max_length == 256
    raw = load_raw(g["data"].dataset[0])
    assert raw.records[0]["messages"][-1] == {"role": "assistant", "content": "good 0"}
    assert raw.records[0]["rejected_messages"][1] == {"role": "user", "content": "Translate 0"}
    with caplog.at_level(logging.INFO):
        assert main(["train", str(cfg)]) == 0
    assert (tmp_path / "v1out" / "adapter_config.json").exists()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "the stage comes from LLaMA-Factory's command" in text and "format swift3" in text


def test_v1_dataset_yaml_and_refusals(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                 "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]})
                     + "\n")
    spec = tmp_path / "v1_dpo_demo.yaml"
    spec.write_text(yaml.safe_dump({"local": {"path": str(pairs), "source": "local", "converter": "pair", "size": 1}}))
    cfg = tmp_path / "v1.yaml"
    base = {"model": "m", "model_class": "llm", "train_dataset": str(spec), "micro_batch_size": 1, "bf16": False}
    cfg.write_text(yaml.safe_dump(base))
    g = parse(str(cfg))
    assert g["data"].dataset == [f"{pairs}#1"] and not g["peft"].use_peft  # no peft_config: all weights
    for extra, message in (({"peft_config": {"name": "freeze"}}, "peft_config name freeze"),
                           ({"cp_size": 2}, "context parallel"), ({"model": None}, "names no model (model)"),
                           ({"custom_chat_template": "{{x}}"}, "custom_chat_template")):
        cfg.write_text(yaml.safe_dump({**base, **extra}))
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse(str(cfg))
    spec.write_text(yaml.safe_dump({"sft": {"path": "x.json", "source": "local", "converter": "alpaca"}}))
    cfg.write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match="converter alpaca: SFT data"):
        parse(str(cfg))
