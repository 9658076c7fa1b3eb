"""TRL's own example scripts with only the trainer / config import switched to ``preftune.trl`` (issue 22).

Each runner below has the *shape* of one TRL script (written here, not copied): the same parser over
the same dataclasses (TRL's ``ScriptArguments`` and ``ModelConfig``, the config class from
``preftune.trl``), the same calls in the same order (``model_init_kwargs`` as ``trl/scripts/*.py`` set
them, ``load_dataset(dataset_name, name=dataset_config)``, ``get_peft_config(model_args)``,
``train()``, ``save_model``). The 13 command lines are TRL's documented ones (the scripts' docstrings,
``docs/source/{cpo,orpo}_trainer.md``, ``peft_integration.md``, ``clis.md``; the reward lines are those of
the reward script's docstring, ``examples/scripts/reward_modeling.py`` today), run with a tiny local model
and a tiny local dataset in place of the Hub's, for one step (``--max_steps 1``; with ``--eval_steps 1``
where the line evaluates).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import save_tiny_model

pytest.importorskip("trl")

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

# TRL's documented command lines (MODEL / DATA: the Hub ids they name, replaced by the local ones)
COMMANDS: dict[str, tuple[str, list[str]]] = {
    # trl/scripts/dpo.py, its docstring: full, then LoRA
    "dpo-full": ("dpo", ["--dataset_name", "DATA", "--model_name_or_path", "MODEL", "--learning_rate", "5.0e-7",
                         "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--max_steps", "1000",
                         "--gradient_accumulation_steps", "8", "--eval_strategy", "steps", "--eval_steps", "50",
                         "--output_dir", "Qwen2-0.5B-DPO", "--no_remove_unused_columns"]),
    "dpo-lora": ("dpo", ["--dataset_name", "DATA", "--model_name_or_path", "MODEL", "--learning_rate", "5.0e-6",
                         "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--max_steps", "1000",
                         "--gradient_accumulation_steps", "8", "--eval_strategy", "steps", "--eval_steps", "50",
                         "--output_dir", "Qwen2-0.5B-DPO", "--no_remove_unused_columns", "--use_peft",
                         "--lora_r", "32", "--lora_alpha", "16"]),
    # docs/source/peft_integration.md
    "dpo-lora-peft-docs": ("dpo", ["--model_name_or_path", "MODEL", "--dataset_name", "DATA", "--learning_rate",
                                   "5.0e-6", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
                                   "8", "--use_peft", "--lora_r", "32", "--lora_alpha", "16", "--output_dir",
                                   "Qwen2-0.5B-DPO-LoRA"]),
    # docs/source/clis.md: `trl dpo` runs trl/scripts/dpo.py
    "dpo-cli": ("dpo", ["--model_name_or_path", "MODEL", "--dataset_name", "DATA"]),
    # the reward script's docstring: full, then LoRA (task SEQ_CLS)
    "reward-full": ("reward", ["--model_name_or_path", "MODEL", "--dataset_name", "DATA", "--output_dir",
                               "Qwen2-0.5B-Reward", "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
                               "--learning_rate", "1.0e-5", "--eval_strategy", "steps", "--eval_steps", "50",
                               "--max_length", "2048"]),
    "reward-lora": ("reward", ["--model_name_or_path", "MODEL", "--dataset_name", "DATA", "--output_dir",
                               "Qwen2-0.5B-Reward-LoRA", "--per_device_train_batch_size", "8", "--num_train_epochs",
                               "1", "--learning_rate", "1.0e-4", "--eval_strategy", "steps", "--eval_steps", "50",
                               "--max_length", "2048", "--use_peft", "--lora_task_type", "SEQ_CLS", "--lora_r", "32",
                               "--lora_alpha", "16"]),
    # docs/source/clis.md: `trl reward` runs trl/scripts/reward.py
    "reward-cli": ("reward", ["--model_name_or_path", "MODEL", "--dataset_name", "DATA"]),
    # examples/scripts/cpo.py, its docstring: full, then LoRA
    "cpo-full": ("cpo", ["--dataset_name", "DATA", "--model_name_or_path", "MODEL", "--per_device_train_batch_size",
                         "4", "--max_steps", "1000", "--learning_rate", "8e-6", "--gradient_accumulation_steps", "1",
                         "--eval_steps", "500", "--output_dir", "gpt2-aligned-cpo", "--warmup_steps", "150",
                         "--logging_first_step", "--no_remove_unused_columns"]),
    "cpo-lora": ("cpo", ["--dataset_name", "DATA", "--model_name_or_path", "MODEL", "--per_device_train_batch_size",
                         "4", "--max_steps", "1000", "--learning_rate", "8e-5", "--gradient_accumulation_steps", "1",
                         "--eval_steps", "500", "--output_dir", "gpt2-lora-aligned-cpo", "--optim", "rmsprop",
                         "--warmup_steps", "150", "--logging_first_step", "--no_remove_unused_columns", "--use_peft",
                         "--lora_r", "16", "--lora_alpha", "16"]),
    # docs/source/cpo_trainer.md
    "cpo-docs": ("cpo", ["--model_name_or_path", "MODEL", "--dataset_name", "DATA", "--num_train_epochs", "1",
                         "--output_dir", "Qwen2-0.5B-CPO"]),
    # examples/scripts/orpo.py, its docstring: full, then LoRA
    "orpo-full": ("orpo", ["--dataset_name", "DATA", "--model_name_or_path", "MODEL", "--per_device_train_batch_size",
                           "4", "--max_steps", "1000", "--learning_rate", "8e-6", "--gradient_accumulation_steps", "1",
                           "--eval_steps", "500", "--output_dir", "gpt2-aligned-orpo", "--warmup_steps", "150",
                           "--logging_first_step", "--no_remove_unused_columns"]),
    "orpo-lora": ("orpo", ["--dataset_name", "DATA", "--model_name_or_path", "MODEL", "--per_device_train_batch_size",
                           "4", "--max_steps", "1000", "--learning_rate", "8e-5", "--gradient_accumulation_steps", "1",
                           "--eval_steps", "500", "--output_dir", "gpt2-lora-aligned-orpo", "--optim", "rmsprop",
                           "--warmup_steps", "150", "--logging_first_step", "--no_remove_unused_columns",
                           "--use_peft", "--lora_r", "16", "--lora_alpha", "16"]),
    # docs/source/orpo_trainer.md
    "orpo-docs": ("orpo", ["--model_name_or_path", "MODEL", "--dataset_name", "DATA", "--num_train_epochs", "1",
                           "--output_dir", "Qwen2-0.5B-ORPO"]),
}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A tiny Llama (byte tokenizer with a chat template) and two tiny datasets in the Hub sets' formats:
    UltraFeedback's (conversational, implicit prompt) and HH-RLHF TRL-style's (conversational, explicit prompt)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("trl-scripts")
    model = save_tiny_model(root / "model", layers=1)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model)

    def turn(role, text):
        return {"role": role, "content": text}

    for name, explicit in (("ultrafeedback", False), ("hh-trl-style", True)):
        (root / name).mkdir()
        for split, n in (("train", 8), ("test", 4)):
            rows = []
            for i in range(n):
                prompt = [turn("user", f"Q{split}{i}: what colour is the sky?")]
                chosen, rejected = [turn("assistant", f"Blue, {i}.")], [turn("assistant", f"Green{i}!")]
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected} if explicit else
                            {"chosen": prompt + chosen, "rejected": prompt + rejected, "score_chosen": 8.0,
                             "score_rejected": 2.0})
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": model, "ultrafeedback": str(root / "ultrafeedback"), "hh": str(root / "hh-trl-style")}


def _argv(script: str, argv: list[str], local: dict, out: Path) -> list[str]:
    data = local["hh"] if script == "orpo" else local["ultrafeedback"]  # orpo.py's docstring: hh-rlhf TRL-style
    argv = [local["model"] if a == "MODEL" else data if a == "DATA" else a for a in argv]
    if "--output_dir" in argv:
        argv[argv.index("--output_dir") + 1] = str(out)
    else:
        argv += ["--output_dir", str(out)]
    one_step = ["--max_steps", "1", "--report_to", "none", "--save_strategy", "no"]
    if "--eval_strategy" in argv:
        one_step += ["--eval_steps", "1"]
    return argv + one_step  # argparse: the last value of a repeated flag wins


def run_trl_script(script: str, argv: list[str]):
    """trl/scripts/dpo.py and reward.py (TRL 1.16): TrlParser over (ScriptArguments, <Config>, ModelConfig,
    DatasetMixtureConfig), model_init_kwargs from ModelConfig, the model given by name."""
    from datasets import load_dataset
    from trl import (
        DatasetMixtureConfig,
        ModelConfig,
        ScriptArguments,
        TrlParser,
        get_peft_config,
        get_quantization_config,
    )

    from preftune.trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    config_class, trainer_class = (DPOConfig, DPOTrainer) if script == "dpo" else (RewardConfig, RewardTrainer)
    parser = TrlParser((ScriptArguments, config_class, ModelConfig, DatasetMixtureConfig))
    script_args, training_args, model_args, _ = parser.parse_args_and_config(argv, fail_with_unknown_args=False)
    model_init_kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                             attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                           streaming=script_args.dataset_streaming)
    trainer = trainer_class(
        model=model_args.model_name_or_path, args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args), peft_config=get_peft_config(model_args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return trainer, model_args


def run_example_script(script: str, argv: list[str]):
    """examples/scripts/cpo.py and orpo.py: HfArgumentParser over (ScriptArguments, <Config>, ModelConfig),
    model and tokenizer loaded by the script (pad = eos when missing)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
    from trl import ModelConfig, ScriptArguments, get_peft_config

    from preftune.trl import CPOConfig, CPOTrainer, ORPOConfig, ORPOTrainer

    config_class, trainer_class = (CPOConfig, CPOTrainer) if script == "cpo" else (ORPOConfig, ORPOTrainer)
    parser = HfArgumentParser((ScriptArguments, config_class, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_into_dataclasses(argv)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    trainer = trainer_class(
        model, args=training_args, train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer, peft_config=get_peft_config(model_args))
    trainer.train()
    trainer.save_model(training_args.output_dir)
    return trainer, model_args


@pytest.mark.parametrize("name", list(COMMANDS))
def test_trl_documented_command_line_runs_with_the_import_switched(name, local, tmp_path):
    script, argv = COMMANDS[name]
    out = tmp_path / "out"
    runner = run_trl_script if script in ("dpo", "reward") else run_example_script
    trainer, model_args = runner(script, _argv(script, argv, local, out))
    assert trainer.state.global_step == 1
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    if "--eval_strategy" in argv:  # evaluated at step 1, on the script's test split
        assert any(math.isfinite(h.get("eval_loss", math.nan)) for h in trainer.state.log_history)
    if model_args.use_peft:
        assert (out / "adapter_config.json").is_file()
        trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n or "score" in n for n in trainable)
    else:
        assert (out / "model.safetensors").is_file()
    assert (out / "preftune_config.yaml").is_file()
