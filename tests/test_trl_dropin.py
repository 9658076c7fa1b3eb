"""What a TRL user hits first when switching ``from trl`` to ``from preftune.trl`` (issue 22).

Each test shows one TRL behaviour a script relies on: the implicit prompt taken as TRL takes it,
``max_prompt_length == max_length`` as older TRL accepted it, the ``--no_X`` form of every boolean
flag, ``model_init_kwargs`` as TRL's own scripts pass them, a given ``ref_model`` kept, ``aux_loss_enabled``,
several eval sets, and TRL's exception types. Tiny random models, as in ``test_python_api.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import byte_tokenizer, save_tiny_model

from preftune.config import DataArguments
from preftune.data import load_raw, normalise

ASSISTANT = "\n\nAssistant:"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random one-layer Llama + byte tokenizer, saved with save_pretrained."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-dropin"), layers=1)


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def standard(n: int) -> list[dict]:
    return [{"prompt": f"Q{i}: colour?", "chosen": f" {i} blue.", "rejected": f" No{i}."} for i in range(n)]


def dpo_args(tmp_path: Path, **kwargs):
    from preftune.trl import DPOConfig

    base = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, save_strategy="no",
                report_to="none", logging_steps=1)
    base.update(kwargs)
    return DPOConfig(**base)


# ------------------------------------------------------------------------------------------------
# 1. TRL's implicit prompt: the longest common prefix of chosen and rejected
# ------------------------------------------------------------------------------------------------
def test_implicit_prompt_text_is_the_longest_common_prefix(tmp_path):
    records = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},  # TRL's implicit-prompt records
               {"chosen": "Water boils at 100 C.", "rejected": "Water boils at 50 C."},
               {"chosen": "Yes", "rejected": "Yes!"}]  # a prefix of the other: its last character is the completion
    path = write_jsonl(tmp_path / "implicit.jsonl", records)
    data = normalise(load_raw(path), DataArguments())
    assert data.format == "implicit_prompt" and data.kind == "text"
    assert data.records[0] == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert data.records[1] == {"prompt": "Water boils at", "chosen": " 100 C.", "rejected": " 50 C."}
    assert data.records[2] == {"prompt": "Ye", "chosen": "s", "rejected": "s!"}


def test_implicit_prompt_equals_trl_extract_prompt(tmp_path):
    """TRL's own function on the same records, where no HH-RLHF turn is involved; on HH-RLHF pairs whose
    replies differ from their first word on, the two rules agree too."""
    from trl.data_utils import extract_prompt

    turn = "\n\nHuman: Tell me a fact." + ASSISTANT
    records = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
               {"chosen": "a b c d", "rejected": "a b x"},
               {"chosen": "Same", "rejected": "Same"},
               {"chosen": turn + " Water boils at 100 C.", "rejected": turn + " No."}]
    path = write_jsonl(tmp_path / "implicit.jsonl", records)
    data = normalise(load_raw(path), DataArguments())
    assert data.records == [extract_prompt(r) for r in records]


def test_implicit_prompt_without_shared_text_names_the_record(tmp_path):
    from preftune.errors import DataError

    path = write_jsonl(tmp_path / "implicit.jsonl", [{"chosen": "Yes.", "rejected": "No."}])
    with pytest.raises(DataError, match=rf"^{path}, line 1, field 'chosen': chosen and rejected share no leading text"):
        normalise(load_raw(path), DataArguments())


def test_dpo_trainer_trains_on_trl_implicit_prompt_records(model_dir, tmp_path):
    from datasets import Dataset

    from preftune.trl import DPOTrainer

    records = [{"chosen": f"Item {i} is blue.", "rejected": f"Item {i} is green."} for i in range(4)]
    trainer = DPOTrainer(model_dir, args=dpo_args(tmp_path), train_dataset=Dataset.from_list(records))
    assert "implicit_prompt" in trainer.data_report
    trainer.train()
    assert trainer.state.global_step == 1


# ------------------------------------------------------------------------------------------------
# 2. max_prompt_length == max_length, as older TRL accepted it (seed 001's DPO script)
# ------------------------------------------------------------------------------------------------
def test_prompt_budget_equal_to_max_length_is_accepted_and_a_full_prompt_counted(model_dir, tmp_path, caplog):
    import math

    from datasets import Dataset

    from preftune.trl import DPOConfig, DPOTrainer

    records = standard(4) + [{"prompt": "A long question " * 4, "chosen": " yes", "rejected": " no"}]
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                     save_strategy="no", report_to="none", logging_steps=1)
    # the seeds' shape: the lengths given to the trainer (older TRL), max_prompt_length == max_length
    with caplog.at_level("WARNING", logger="preftune.trl"):
        trainer = DPOTrainer(model_dir, None, args=args, train_dataset=Dataset.from_list(records),
                             max_length=24, max_prompt_length=24)
    assert trainer.preftune_groups.data.max_prompt_length == 24
    assert "1 prompts truncated" in trainer.data_report and "1 dropped" in trainer.data_report
    assert len(trainer.train_dataset) == 4
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_prompt_budget_above_max_length_through_the_trl_door_and_the_cli():
    from preftune.config import ConfigError
    from preftune.trl import DPOConfig

    assert DataArguments(max_length=512, max_prompt_length=512).max_prompt_length == 512  # the CLI accepts equality
    with pytest.raises(ConfigError, match=r"--max_prompt_length \(600\) exceeds --max_length \(512\)"):
        DataArguments(max_length=512, max_prompt_length=600)  # the CLI refuses a budget above the whole length
    config = DPOConfig(output_dir="unused", max_length=512, max_prompt_length=600)  # TRL accepts it: same truncation
    assert config.preftune_groups().data.max_prompt_length == 512


# ------------------------------------------------------------------------------------------------
# 3. every boolean flag keeps its --no_ form (TRL's documented commands: --no_remove_unused_columns)
# ------------------------------------------------------------------------------------------------
def _bool_fields(cls: type) -> list[str]:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if f.init and hints[f.name] in (bool, typing.Optional[bool])]


def test_every_boolean_flag_of_every_group_has_its_no_form():
    from transformers import HfArgumentParser

    from preftune.cli_args import TRAIN_GROUPS, make_parser
    from preftune.trl import CPOConfig, DPOConfig, ORPOConfig, RewardConfig

    parsers = [(make_parser(), [name for g in TRAIN_GROUPS for name in _bool_fields(g)])]
    parsers += [(HfArgumentParser((c,)), _bool_fields(c)) for c in (CPOConfig, DPOConfig, ORPOConfig, RewardConfig)]
    for parser, names in parsers:
        assert "remove_unused_columns" in names and len(names) > 20
        for name in names:
            for flag in (f"--no_{name}", f"--no-{name.replace('_', '-')}"):
                namespace, rest = parser.parse_known_args([flag])
                assert not rest and getattr(namespace, name) is False, flag
        namespace, _ = parser.parse_known_args(["--remove_unused_columns"])  # the plain forms still work
        assert namespace.remove_unused_columns is True
        namespace, _ = parser.parse_known_args(["--remove_unused_columns", "false"])
        assert namespace.remove_unused_columns is False


def test_trl_documented_command_line_parses_with_preftune_configs():
    from trl import ModelConfig, ScriptArguments, TrlParser

    from preftune.cli_args import parse_groups
    from preftune.trl import DPOConfig

    argv = ["--dataset_name", "trl-lib/ultrafeedback_binarized", "--model_name_or_path", "Qwen/Qwen2-0.5B-Instruct",
            "--learning_rate", "5.0e-7", "--output_dir", "Qwen2-0.5B-DPO", "--no_remove_unused_columns",
            "--use_peft", "--lora_r", "32", "--lora_alpha", "16"]
    _, config, _ = TrlParser((ScriptArguments, DPOConfig, ModelConfig)).parse_args_and_config(argv)
    assert config.remove_unused_columns is False and config.learning_rate == 5e-7
    run = parse_groups(["--no_remove_unused_columns", "--no_precompute_ref_log_probs", "--use_peft", "--no_bf16"])
    assert run.training.remove_unused_columns is False and run.engine.precompute_ref_log_probs is False
    assert run.peft.use_peft is True and run.training.bf16 is False


# ------------------------------------------------------------------------------------------------
# 4. model_init_kwargs as TRL's scripts pass them (trl/scripts/dpo.py, reward.py)
# ------------------------------------------------------------------------------------------------
def test_model_init_kwargs_of_trl_scripts_load_the_model(model_dir, tmp_path):
    from datasets import Dataset

    from preftune.trl import DPOTrainer

    init = dict(revision="main", trust_remote_code=False, attn_implementation=None, dtype="auto")
    trainer = DPOTrainer(model_dir, args=dpo_args(tmp_path, model_init_kwargs=init),
                         train_dataset=Dataset.from_list(standard(4)))
    model_args = trainer.preftune_groups.model
    assert model_args.attn_implementation == "sdpa" and model_args.dtype == "auto"  # the model's default: sdpa
    assert trainer.model.config._attn_implementation == "sdpa"


def test_attn_implementation_none_is_the_models_default_not_sdpa(tmp_path):
    """GPT-OSS does not support sdpa: None must mean its default (eager), as from_pretrained chooses."""
    from transformers import GptOssConfig

    from preftune.trl_support import model_init_arguments

    GptOssConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 intermediate_size=32, num_local_experts=2, vocab_size=300).save_pretrained(tmp_path)
    args = model_init_arguments(str(tmp_path), {"attn_implementation": None, "revision": None, "dtype": None},
                                False, "DPOTrainer")
    assert args.attn_implementation == "eager" and args.dtype == "float32"
    assert model_init_arguments(str(tmp_path), {"attn_implementation": "sdpa"}, False, "x").attn_implementation == "sdpa"


def test_other_model_init_kwargs_reach_from_pretrained(model_dir, tmp_path, monkeypatch):
    """revision, device_map, low_cpu_mem_usage ...: passed to from_pretrained as given (TRL forwards them)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from preftune.trl import DPOTrainer

    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    init = {"revision": "v1.0", "device_map": "cpu", "low_cpu_mem_usage": True, "torch_dtype": "float32",
            "attn_implementation": "eager"}
    trainer = DPOTrainer(model_dir, args=dpo_args(tmp_path, model_init_kwargs=init),
                         train_dataset=Dataset.from_list(standard(4)))
    assert seen and {"revision": "v1.0", "device_map": "cpu", "low_cpu_mem_usage": True}.items() <= seen[0].items()
    assert seen[0]["attn_implementation"] == "eager" and "torch_dtype" not in seen[0]  # read as dtype
    assert trainer.model.config._attn_implementation == "eager"


# ------------------------------------------------------------------------------------------------
# 5. a given ref_model is kept (precompute_ref_log_probs on, preftune's default)
# ------------------------------------------------------------------------------------------------
def test_given_ref_model_is_kept_and_scores_new_eval_data(model_dir, tmp_path):
    import math

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from preftune.trl import DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = dpo_args(tmp_path)
    assert args.precompute_ref_log_probs
    trainer = DPOTrainer(model, ref_model, args=args, train_dataset=Dataset.from_list(standard(4)))
    assert trainer.ref_model is ref_model
    assert trainer.ref_model.get_parameter("model.embed_tokens.weight") is not None  # what TRL's tests read
    trainer.train()
    metrics = trainer.evaluate(eval_dataset=Dataset.from_list(standard(6)[4:]))
    assert math.isfinite(metrics["eval_loss"])


# ------------------------------------------------------------------------------------------------
# 6. trainer.aux_loss_enabled and TRL's MoE default
# ------------------------------------------------------------------------------------------------
def tiny_qwen3_moe(vocab_size: int):
    """A tiny random Qwen3-MoE: its config declares output_router_logits=False (as the released ones)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=256, pad_token_id=0,
                            router_aux_loss_coef=0.05)
    assert config.output_router_logits is False
    return Qwen3MoeForCausalLM(config)


def test_aux_loss_enabled_follows_trl_moe_default(model_dir, tmp_path):
    from datasets import Dataset

    from preftune.trl import CPOConfig, CPOTrainer, DPOTrainer

    tok = byte_tokenizer()
    data = Dataset.from_list(standard(4))
    dpo = DPOTrainer(tiny_qwen3_moe(len(tok)), args=dpo_args(tmp_path), train_dataset=data, processing_class=tok)
    assert dpo.aux_loss_enabled is True  # TRL's DPOTrainer: the config declares output_router_logits
    assert dpo.preftune_groups.loss.router_aux_loss_coef == 0.05
    dpo.train()
    assert any("aux_loss" in h for h in dpo.state.log_history)
    cpo_args = CPOConfig(output_dir=str(tmp_path / "cpo"), max_steps=1, save_strategy="no", report_to="none")
    cpo = CPOTrainer(tiny_qwen3_moe(len(tok)), args=cpo_args, train_dataset=data, processing_class=tok)
    assert cpo.aux_loss_enabled is False  # TRL's CPOTrainer: only with output_router_logits=True
    dense = DPOTrainer(model_dir, args=dpo_args(tmp_path / "dense"), train_dataset=data)
    assert dense.aux_loss_enabled is False
    off = DPOTrainer(tiny_qwen3_moe(len(tok)), args=dpo_args(tmp_path / "off", router_aux_loss_coef=0.0),
                     train_dataset=data, processing_class=tok)
    assert off.aux_loss_enabled is False


# ------------------------------------------------------------------------------------------------
# 7. several eval sets: one evaluation per set, prefix eval_<name>_ (transformers.Trainer's rule)
# ------------------------------------------------------------------------------------------------
def test_several_eval_sets_each_evaluated_with_its_prefix(model_dir, tmp_path):
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM

    from preftune.trl import DPOTrainer

    sets = DatasetDict({"data1": Dataset.from_list(standard(4)),
                        "data2": Dataset.from_list([{"chosen": "The sky is blue.", "rejected": "The sky is red."}] * 2)})
    args = dpo_args(tmp_path, eval_strategy="steps", eval_steps=1)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir)  # (a live reference for the new set at the end)
    trainer = DPOTrainer(model_dir, ref_model, args=args, train_dataset=Dataset.from_list(standard(4)),
                         eval_dataset=sets)
    assert "eval data (data1)" in trainer.data_report and "eval data (data2)" in trainer.data_report
    trainer.train()
    logged = {key for h in trainer.state.log_history for key in h}
    for name in ("data1", "data2"):
        assert {f"eval_{name}_loss", f"eval_{name}_rewards/accuracies"} <= logged
    assert "eval_loss" not in logged and "eval_rewards/accuracies" not in logged
    metrics = trainer.evaluate()
    assert {"eval_data1_loss", "eval_data2_loss", "eval_data2_rewards/margins"} <= set(metrics)
    assert metrics["eval_data1_loss"] != metrics["eval_data2_loss"]
    again = trainer.evaluate(eval_dataset={"new": standard(6)[4:]})  # a dict given here: the same rule
    assert "eval_new_loss" in again and "eval_new_rewards/chosen" in again


# ------------------------------------------------------------------------------------------------
# 8. TRL's exception types where a user's `except` depends on them
# ------------------------------------------------------------------------------------------------
def test_custom_code_without_trust_remote_code_is_a_value_error(model_dir, tmp_path, capsys):
    import shutil

    from datasets import Dataset

    from preftune.cli import main
    from preftune.errors import ModelLoadError
    from preftune.trl import DPOTrainer

    remote = tmp_path / "remote-code"
    shutil.copytree(model_dir, remote)
    (remote / "config.json").write_text(json.dumps({
        "model_type": "preftune_remote_test", "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig",
                                                           "AutoModelForCausalLM": "modeling_remote.RemoteModel"}}))
    with pytest.raises(ValueError, match="trust_remote_code") as caught:  # TRL's type (transformers raises it)
        DPOTrainer(str(remote), args=dpo_args(tmp_path), train_dataset=Dataset.from_list(standard(4)))
    assert isinstance(caught.value, ModelLoadError) and isinstance(caught.value, RuntimeError)
    # the CLI's output is unchanged: one line, exit status 2
    assert main(["train", "--model_name_or_path", str(remote), "--output_dir", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("preftune train: error: ") and "trust_remote_code" in err[-1]


def test_sync_ref_model_full_fine_tuning_exposes_the_following_reference(model_dir, tmp_path):
    """TRL's test_train_with_sync_ref_model: ``trainer.ref_model`` exists from construction (full fine-tuning,
    precomputed reference) and is moved towards the policy by the syncs."""
    import torch
    from datasets import Dataset

    from preftune.trl import DPOTrainer

    args = dpo_args(tmp_path, learning_rate=0.1, sync_ref_model=True, ref_model_sync_steps=2, max_steps=4,
                    per_device_train_batch_size=2)
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(standard(8)))
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    before = {n: p.clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    assert all(not torch.equal(before[n], trainer.ref_model.get_parameter(n)) for n in before)


def test_train_dataset_column_names_are_trls(model_dir, tmp_path):
    from datasets import Dataset

    from preftune.trl import DPOTrainer, RewardConfig, RewardTrainer

    trainer = DPOTrainer(model=model_dir, args=dpo_args(tmp_path), train_dataset=Dataset.from_list(standard(2)))
    assert trainer.train_dataset.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    rows = [{"chosen_input_ids": [5, 6, 7, 2], "rejected_input_ids": [5, 6, 9, 2]}] * 2
    reward = RewardTrainer(model=model_dir, args=RewardConfig(output_dir=str(tmp_path / "rm"), report_to="none",
                                                              bf16=False), train_dataset=Dataset.from_list(rows))
    assert "chosen_ids" in reward.train_dataset.column_names and "chosen_input_ids" not in reward.train_dataset.column_names
