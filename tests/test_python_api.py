"""The TRL-shaped Python API (preftune.trl) and preftune.train(config).

TRL's CPOTrainer documentation example and a DPO script in the seeds' style run with only the
import line changed (the model path and the data replaced by a tiny model and a small in-memory
set); their losses equal `preftune train`'s on the same data and settings.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_model

from preftune.cli import main
from preftune.config import ConfigError

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (one layer: these tests compare paths, not depth) + byte tokenizer with a
    chat template, saved with save_pretrained."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-chat"), layers=1, chat_template=CHAT_TEMPLATE)


def ultrafeedback_like(n: int) -> list[dict]:
    """Records shaped like trl-lib/ultrafeedback_binarized: chosen/rejected dialogues + scores (short:
    the byte tokenizer spends a token per character)."""
    out = []
    for i in range(n):
        question = f"{i}+{i % 5}?"
        out.append({"chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": f"{i + i % 5}"}],
                    "rejected": [{"role": "user", "content": question},
                                 {"role": "assistant", "content": f"{i * 3 + 1}?"}],
                    "score_chosen": 8.0, "score_rejected": 3.0})
    return out


def standard(n: int) -> list[dict]:
    return [{"prompt": f"Q{i}: colour?", "chosen": f" {i} blue.", "rejected": f" No{i}."} for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


def cli_history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


# ------------------------------------------------------------------------------------------------
# TRL's CPOTrainer documentation example (docs/source/cpo_trainer.md, "Quick start")
# ------------------------------------------------------------------------------------------------
def test_trl_cpo_doc_example_equals_preftune_train(model_dir, tmp_path):
    records = ultrafeedback_like(32)
    out_api = tmp_path / "Qwen2-0.5B-CPO"

    # --- the documented script; only the import line, the model path and the data changed ---
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.trl import CPOConfig, CPOTrainer  # was: from trl import CPOConfig, CPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_dataset = Dataset.from_list(records)  # was: load_dataset("trl-lib/ultrafeedback_binarized", ...)

    training_args = CPOConfig(output_dir=str(out_api))
    trainer = CPOTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=train_dataset)
    trainer.train()
    # ---

    api = losses(trainer.state.log_history)
    assert trainer.state.global_step == 12  # 32 pairs / 8 per step, 3 epochs (TRL's and transformers' defaults)
    assert len(api) == 1  # logging_steps 10: the mean of steps 1-10
    # the same run from the command line: TRL's CPOConfig defaults spelled out as flags
    out_cli = tmp_path / "cli"
    assert main(["train", "--model_name_or_path", model_dir, "--dataset", write_jsonl(tmp_path / "uf.jsonl", records),
                 "--loss", "cpo", "--beta", "0.1", "--cpo_alpha", "1.0", "--learning_rate", "1e-6",
                 "--max_length", "1024", "--activation_checkpointing", "true", "--num_train_epochs", "3",
                 "--logging_steps", "10", "--output_dir", str(out_cli), "--save_strategy", "no"]) == 0
    history = cli_history(out_cli)
    assert api == pytest.approx(losses(history), abs=1e-6)
    final = [h for h in trainer.state.log_history if "train_loss" in h][0]["train_loss"]
    assert final == pytest.approx(json.loads((out_cli / "train_results.json").read_text())["train_loss"], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# A DPO script in the seeds' style, today's spelling and the older one
# ------------------------------------------------------------------------------------------------
def dpo_flags(model_dir: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", model_dir, "--dataset", data, "--output_dir", str(out),
            "--loss", "dpo", "--beta", "0.2", "--learning_rate", "1e-2", "--max_steps", "3",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
            "--max_length", "512", "--max_prompt_length", "256", "--use_peft", "--lora_r", "4",
            "--lora_alpha", "8", "--lora_dropout", "0", "--lora_target_modules", "q_proj", "v_proj", *extra]


def test_seed_dpo_script_equals_preftune_train(model_dir, tmp_path):
    records = standard(12)
    out_cli = tmp_path / "cli"
    assert main(dpo_flags(model_dir, write_jsonl(tmp_path / "d.jsonl", records), out_cli,
                          "--activation_checkpointing", "true")) == 0
    cli = cli_history(out_cli)

    # --- the script; only the import line changed (model path and data: tiny ones) ---
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.trl import DPOConfig, DPOTrainer  # was: from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = Dataset.from_list(records)
    args = DPOConfig(output_dir=str(tmp_path / "api"), beta=0.2, learning_rate=1e-2, max_steps=3,
                     per_device_train_batch_size=4, logging_steps=1, save_strategy="no", max_length=512,
                     max_prompt_length=256, report_to="none")
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                             task_type="CAUSAL_LM")
    trainer = DPOTrainer(model, ref_model=None, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=peft_config)
    trainer.train()
    # ---

    api = trainer.state.log_history
    assert losses(api)[0] == pytest.approx(0.693147, abs=1e-5)  # policy == reference at step 1
    assert losses(api) == pytest.approx(losses(cli), abs=1e-6)  # first loss and the two after it
    margins = [h["rewards/margins"] for h in api if "loss" in h]
    assert margins == pytest.approx([h["rewards/margins"] for h in cli if "loss" in h], abs=1e-6)
    assert margins[-1] != 0.0  # the adapter moved, so beta took effect

    metrics = trainer.evaluate(Dataset.from_list(standard(4)))
    assert "eval_loss" in metrics and "eval_rewards/accuracies" in metrics
    trainer.save_model()
    out = Path(args.output_dir)
    assert (out / "adapter_model.safetensors").is_file() and (out / "preftune_config.yaml").is_file()


def test_older_keywords_log_todays_spelling_and_take_effect(model_dir, tmp_path, caplog):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from preftune.trl import DPOConfig, DPOTrainer

    records = standard(12)
    peft = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    common = dict(learning_rate=1e-2, max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                  save_strategy="no", report_to="none")
    runs = {}
    for style in ("today", "older", "oldest"):
        caplog.clear()
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        out = str(tmp_path / style)
        with caplog.at_level(logging.INFO, logger="preftune.trl"):
            if style == "today":
                trainer = DPOTrainer(model, ref_model=None, train_dataset=Dataset.from_list(records),
                                     args=DPOConfig(out, beta=0.3, max_length=200, max_prompt_length=100,
                                                    activation_checkpointing=False, **common),
                                     processing_class=tok, peft_config=LoraConfig(**peft))
            elif style == "older":  # TRL 0.9 - 0.11: config object, but tokenizer= and loss keywords on the trainer
                trainer = DPOTrainer(model, None, args=DPOConfig(out, activation_checkpointing=False, **common),
                                     beta=0.3, train_dataset=Dataset.from_list(records), tokenizer=tok,
                                     max_length=200, max_prompt_length=100, peft_config=LoraConfig(**peft))
            else:  # TRL < 0.9: plain TrainingArguments
                trainer = DPOTrainer(model, None, args=TrainingArguments(out, **common), beta=0.3,
                                     train_dataset=Dataset.from_list(records), tokenizer=tok, max_length=200,
                                     max_prompt_length=100, peft_config=LoraConfig(**peft))
        notices = [r.getMessage() for r in caplog.records if r.name == "preftune.trl" and "older TRL" in r.getMessage()]
        if style == "today":
            assert notices == []
        else:
            assert len(notices) == 1, notices
            for spelling in ("tokenizer= → processing_class=", "beta= → DPOConfig(beta=)",
                             "max_length= → DPOConfig(max_length=)", "max_prompt_length= → DPOConfig(max_prompt_length=)"):
                assert spelling in notices[0]
            assert ("TrainingArguments(...) → args=DPOConfig(...)" in notices[0]) == (style == "oldest")
        groups = trainer.preftune_groups
        assert (groups[3].beta, groups[2].max_length, groups[2].max_prompt_length) == (0.3, 200, 100)
        trainer.train()
        runs[style] = losses(trainer.state.log_history)
    assert runs["older"] == pytest.approx(runs["today"], abs=1e-6)
    assert runs["oldest"] == pytest.approx(runs["today"], abs=1e-6)


def test_dpo_full_fine_tuning_reference_paths_agree(model_dir, tmp_path, caplog):
    """ref_model=None (precomputed from the model as passed, keyed by its weights), a ref_model given (live)
    and ref_model=None without precompute (a frozen copy, live) give one trajectory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.trl import DPOConfig, DPOTrainer

    runs = {}
    for name, given_ref, precompute in (("pre", False, True), ("given", True, False), ("copy", False, False)):
        args = DPOConfig(str(tmp_path / name), learning_rate=1e-3, max_steps=2, per_device_train_batch_size=4,
                         logging_steps=1, save_strategy="no", report_to="none", precompute_ref_log_probs=precompute)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="preftune.engine"):
            ref = AutoModelForCausalLM.from_pretrained(model_dir) if given_ref else None
            tok = None if given_ref else AutoTokenizer.from_pretrained(model_dir)  # None: loaded from the model's path
            trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(model_dir), ref, args=args,
                                 train_dataset=standard(8), processing_class=tok)
        precomputed = [r for r in caplog.records if "reference log-probs for" in r.getMessage()]
        assert len(precomputed) == int(precompute)
        assert (trainer.ref_model is not None) == (not precompute)
        trainer.train()
        runs[name] = [h["rewards/margins"] for h in trainer.state.log_history if "loss" in h]
    assert runs["pre"][0] == pytest.approx(0.0, abs=1e-6) and runs["pre"][1] != 0.0
    assert runs["given"] == pytest.approx(runs["pre"], abs=1e-5)
    assert runs["copy"] == pytest.approx(runs["pre"], abs=1e-5)


def test_unknown_trainer_keyword_is_a_type_error_with_a_hint(model_dir):
    from preftune.trl import DPOTrainer

    with pytest.raises(TypeError, match="'bta'; did you mean 'beta'"):
        DPOTrainer(model_dir, train_dataset=standard(2), bta=0.1)


# ------------------------------------------------------------------------------------------------
# ORPO, other data formats, mapping of the config fields
# ------------------------------------------------------------------------------------------------
def test_orpo_trainer_swift_records_train_evaluate_save_reload(model_dir, tmp_path):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from preftune.trl import ORPOConfig, ORPOTrainer

    swift = [{"system": "Be brief.", "query": f"Colour {i}?", "response": "Blue.", "rejected_response": "No idea.",
              "history": [["Hi", "Hello!"]]} for i in range(8)]
    args = ORPOConfig(output_dir=str(tmp_path / "orpo"), max_steps=2, per_device_train_batch_size=4,
                      logging_steps=1, learning_rate=1e-2, save_strategy="no", report_to="none")
    trainer = ORPOTrainer(model=model_dir, args=args, train_dataset=swift, eval_dataset=swift[:4],
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert trainer.preftune_groups[3].loss == "orpo"
    assert "format swift2" in trainer.data_report
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and logs[0]["loss"] != logs[1]["loss"] and "log_odds_ratio" in logs[0]
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and "eval_log_odds_chosen" in metrics
    trainer.save_model()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(tmp_path / "orpo"))
    assert sum(p.numel() for n, p in reloaded.named_parameters() if "lora_" in n) > 0


def test_reward_trainer_equals_preftune_train_rm(model_dir, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig

    from preftune.trl import RewardConfig, RewardTrainer

    records = standard(8) + [{"prompt": "Same?", "chosen": " Yes.", "rejected": " Yes."}]  # identical: skipped
    out_cli = tmp_path / "cli"
    assert main(["train", "--model_name_or_path", model_dir, "--dataset", write_jsonl(tmp_path / "r.jsonl", records),
                 "--loss", "rm", "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
                 "--lora_target_modules", "q_proj", "v_proj", "--learning_rate", "1e-3", "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--logging_steps", "1", "--max_length", "1024",
                 "--max_prompt_length", "256", "--save_strategy", "no", "--output_dir", str(out_cli),
                 "--activation_checkpointing", "true"]) == 0
    args = RewardConfig(output_dir=str(tmp_path / "rm"), learning_rate=1e-3, max_steps=2, per_device_train_batch_size=4,
                        logging_steps=1, max_prompt_length=256, save_strategy="no", report_to="none")
    trainer = RewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(records),
                            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   task_type="SEQ_CLS"))
    assert "1 pairs with identical chosen and rejected tokens skipped" in trainer.data_report
    trainer.train()
    assert losses(trainer.state.log_history) == pytest.approx(losses(cli_history(out_cli)), abs=1e-6)
    trainer.save_model()
    assert (tmp_path / "rm" / "value_head.safetensors").is_file()
    with pytest.raises(ConfigError, match="beta does not apply"):
        RewardConfig(output_dir="unused", beta=0.1, report_to="none")


def test_config_fields_map_onto_preftune_groups():
    from preftune.trl import CPOConfig, DPOConfig, ORPOConfig

    def loss(cfg):
        a = cfg.preftune_groups()[3]
        return a.loss, a.beta, a.cpo_alpha, a.rpo_alpha, a.cpo_loss_type, a.dpo_loss_type

    kw = dict(output_dir="unused", report_to="none")
    assert loss(CPOConfig(**kw)) == ("cpo", 0.1, 1.0, None, "sigmoid", "sigmoid")
    assert loss(CPOConfig(loss_type="hinge", **kw))[4] == "hinge"
    assert loss(CPOConfig(loss_type="simpo", **kw))[:3] == ("cpo-simpo", 0.1, 1.0)  # TRL: cpo_alpha 1 by default
    assert loss(CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, **kw))[:3] == ("simpo", 2.0, 0.0)
    assert loss(CPOConfig(loss_type="alphapo", **kw))[:3] == ("simpo", 0.1, 0.0)
    assert loss(DPOConfig(loss_type="ipo", **kw))[5] == "ipo"
    assert loss(DPOConfig(loss_type=["sigmoid", "sft"], **kw))[3] == 1.0
    assert loss(DPOConfig(loss_type=["robust", "sft"], loss_weights=[1.0, 0.25], label_smoothing=0.1, **kw))[3:] == (
        0.25, "sigmoid", "robust")
    assert loss(DPOConfig(rpo_alpha=0.5, **kw))[3] == 0.5
    assert loss(DPOConfig(loss_type="sft", **kw))[0] == "sft"
    assert loss(ORPOConfig(beta=0.25, **kw))[:2] == ("orpo", 0.25)
    cfg = DPOConfig(**kw)  # TRL's defaults where they differ from the CLI's
    data, engine = cfg.preftune_groups()[2], cfg.preftune_groups()[4]
    assert (cfg.learning_rate, data.max_length, data.max_prompt_length, data.truncation_mode) == (
        1e-6, 1024, None, "keep_start")
    assert cfg.activation_checkpointing and cfg.disable_dropout and not cfg.bf16  # bf16 only on CUDA
    assert engine.precompute_ref_log_probs and engine.padding_free
    assert not DPOConfig(gradient_checkpointing=False, **kw).activation_checkpointing
    for bad, match in ((dict(loss_type="exo_pair"), "exo_pair needs label_smoothing"),
                       (dict(use_weighting=True, loss_type=["sigmoid", "sft"]), "use_weighting"),
                       (dict(loss_type=["sigmoid", "sft"], rpo_alpha=1.0), "once"),
                       (dict(loss_type=["nope"]), "not supported"),
                       (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), "f_divergence_type")):
        with pytest.raises(ConfigError, match=match):
            DPOConfig(**bad, **kw)
    assert loss(DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[0.5, 1.0], **kw))[5] == ["sigmoid", "sft"]
    assert CPOConfig(alpha=0.5, **kw).preftune_groups()[3].alpha == 0.5  # AlphaPO
    assert CPOConfig(max_length=64, max_prompt_length=64, **kw).preftune_groups().data.max_prompt_length == 64  # as TRL
    with pytest.raises(ConfigError, match="CPOConfig: --max_prompt_length must be > 0"):
        CPOConfig(max_length=64, max_prompt_length=0, **kw)


def test_trainer_rejects_what_it_cannot_honour(model_dir):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from preftune.data import DataError
    from preftune.trl import CPOTrainer, DPOConfig, DPOTrainer

    with pytest.raises(ConfigError, match="data_collator is not supported"):
        CPOTrainer(model_dir, train_dataset=standard(2), data_collator=lambda batch: batch)
    with pytest.raises(ConfigError, match="use_dora=True not supported"):
        CPOTrainer(model_dir, train_dataset=standard(2), peft_config=LoraConfig(use_dora=True))
    with pytest.raises(ConfigError, match="ref_model given, but sft uses no reference"):
        DPOTrainer(model_dir, ref_model=AutoModelForCausalLM.from_pretrained(model_dir), train_dataset=standard(2),
                   args=DPOConfig("unused", loss_type="sft", report_to="none"))
    with pytest.raises(DataError, match="train_dataset, record 2: expected a dict"):
        CPOTrainer(model_dir, train_dataset=[standard(1)[0], "not a record"])


# ------------------------------------------------------------------------------------------------
# preftune.train(config)
# ------------------------------------------------------------------------------------------------
def test_preftune_train_dict_and_yaml_return_dir_and_metrics(model_dir, tmp_path):
    import preftune

    data = write_jsonl(tmp_path / "d.jsonl", standard(10))
    config = {"model_name_or_path": model_dir, "dataset": data, "use_peft": True, "lora_r": 4, "max_steps": 2,
              "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-2, "eval_ratio": 0.2,
              "save_strategy": "no", "output_dir": str(tmp_path / "run")}
    out, metrics = preftune.train(config)
    assert out == tmp_path / "run" and (out / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "train_results.json").read_text())
    assert metrics["train_loss"] == pytest.approx(saved["train_loss"]) and "eval_loss" in metrics
    # the YAML it wrote repeats the run; keyword overrides win over the file
    again = preftune.train(out / "preftune_config.yaml", output_dir=str(tmp_path / "again"))
    assert again.output_dir == tmp_path / "again"
    assert again.metrics["train_loss"] == pytest.approx(metrics["train_loss"], abs=1e-6)
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        preftune.train({**config, "lr": 1e-3})
    from preftune.train import run_config  # the module is the callable itself

    assert callable(preftune.train) and preftune.train.run_config is run_config


def test_import_preftune_is_cheap():
    code = ("import sys, preftune; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'transformers' not in sys.modules; print(preftune.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
