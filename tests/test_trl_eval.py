"""The TRL door's evaluation and TRL's views (issue 22): ``compute_metrics`` on the per-pair rewards,
``evaluate(eval_dataset=new)`` with precomputed reference log-probs (computed on the fly), TRL's tokenised
columns by key, ``model_tags``, PEFT's own choice of what trains in a reward model, ``chat_template_path``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-trl-eval"), layers=1)


def standard(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Q{i}: colour?", "chosen": f" {i} blue.", "rejected": f" No{i}."} for i in range(start, start + n)]


def args_of(config_class, tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                save_strategy="no", report_to="none", learning_rate=0.05)
    return config_class(**{**base, **kwargs})


def test_compute_metrics_gets_the_per_pair_rewards(model_dir, tmp_path):
    from datasets import Dataset

    from preftune.trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    seen = []

    def metrics(pred):
        seen.append(pred)
        return {"my_metric": 0.123}

    trainer = DPOTrainer(model_dir, args=args_of(DPOConfig, tmp_path / "dpo", eval_strategy="steps", eval_steps=1),
                         train_dataset=Dataset.from_list(standard(4)), eval_dataset=Dataset.from_list(standard(4, 4)),
                         compute_metrics=metrics)
    trainer.train()
    assert trainer.state.log_history[-2]["eval_my_metric"] == 0.123  # TRL's test reads it there
    pred = seen[-1]
    assert pred.predictions.shape == (4, 2) and (pred.label_ids == 0).all()
    logged = trainer.state.log_history[-2]
    assert pred.predictions[:, 0].mean() == pytest.approx(logged["eval_rewards/chosen"], abs=1e-5)
    assert pred.predictions[:, 1].mean() == pytest.approx(logged["eval_rewards/rejected"], abs=1e-5)
    assert (pred.predictions[:, 0] > pred.predictions[:, 1]).mean() == pytest.approx(
        logged["eval_rewards/accuracies"], abs=1e-6)
    rm = RewardTrainer(model_dir, args=args_of(RewardConfig, tmp_path / "rm", eval_strategy="steps", eval_steps=1),
                       train_dataset=Dataset.from_list(standard(4)), eval_dataset=Dataset.from_list(standard(4, 4)),
                       compute_metrics=metrics)
    rm.train()
    assert rm.state.log_history[-2]["eval_my_metric"] == 0.123 and seen[-1].predictions.shape == (4, 2)


def test_new_eval_set_with_precomputed_reference_full_fine_tuning(model_dir, tmp_path):
    """Before training the model is its own reference: evaluate(new) = the same set given at construction.
    After training the reference is gone: a ValueError (TRL's type), as TRL."""
    from datasets import Dataset

    from preftune.trl import DPOConfig, DPOTrainer

    new = standard(4, 10)
    given = DPOTrainer(model_dir, args=args_of(DPOConfig, tmp_path / "a"), train_dataset=Dataset.from_list(standard(4)),
                       eval_dataset=Dataset.from_list(new))
    later = DPOTrainer(model_dir, args=args_of(DPOConfig, tmp_path / "b"), train_dataset=Dataset.from_list(standard(4)))
    assert later.ref_model is None and later.reference_context is None  # precomputed, no live reference
    expected, got = given.evaluate(), later.evaluate(eval_dataset=Dataset.from_list(new))
    for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/margins", "eval_logps/chosen"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    later.train()
    with pytest.raises(ValueError, match="training has started"):
        later.evaluate(eval_dataset=Dataset.from_list(new))


def test_new_eval_set_after_training_a_passed_peft_model(model_dir, tmp_path):
    """A passed PeftModel's reference is its starting adapter: new data after training is scored with it
    swapped in, and equals that data given at construction (same training)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from preftune.trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    new = standard(4, 10)
    runs = []
    for name, eval_at_init in (("a", True), ("b", False)):
        trainer = DPOTrainer(copy.deepcopy(peft_model), args=args_of(DPOConfig, tmp_path / name, max_steps=2),
                             train_dataset=Dataset.from_list(standard(4)),
                             eval_dataset=Dataset.from_list(new) if eval_at_init else None)
        trainer.train()
        runs.append(trainer.evaluate() if eval_at_init else trainer.evaluate(eval_dataset=Dataset.from_list(new)))
        if not eval_at_init:  # the trained adapter is back after the reference pass
            again = trainer.evaluate(eval_dataset=Dataset.from_list(new))
            assert again["eval_loss"] == pytest.approx(runs[-1]["eval_loss"], abs=1e-6)
    assert runs[0]["eval_rewards/margins"] != 0.0
    for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/margins"):
        assert runs[1][key] == pytest.approx(runs[0][key], abs=1e-5), key


def test_tokenised_rows_read_as_trl_columns_and_model_tags(model_dir, tmp_path):
    from datasets import Dataset, DatasetDict

    from preftune.trl import CPOConfig, CPOTrainer, DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    train = Dataset.from_list(standard(4))
    sets = DatasetDict({"data1": Dataset.from_list(standard(2, 4)), "data2": Dataset.from_list(standard(2, 6))})
    dpo = DPOTrainer(model_dir, args=args_of(DPOConfig, tmp_path / "dpo"), train_dataset=train, eval_dataset=sets)
    row = dpo.train_dataset[0]
    assert row["prompt_ids"] == row.prompt_ids and row["chosen_ids"] == row.chosen_ids
    assert "prompt_ids" in next(iter(dpo.eval_dataset["data1"])) and "prompt_ids" in next(iter(dpo.eval_dataset["data2"]))
    assert set(row.keys()) == {"prompt_ids", "chosen_ids", "rejected_ids"}
    with pytest.raises(KeyError, match="prompt_input_ids"):
        row["prompt_input_ids"]
    assert {"trl", "dpo"} <= set(dpo.model.model_tags)
    cpo = CPOTrainer(model_dir, args=args_of(CPOConfig, tmp_path / "cpo"), train_dataset=train,
                     eval_dataset=Dataset.from_list(standard(2, 4)))
    row = next(iter(cpo.eval_dataset))
    assert row["chosen_input_ids"] == row.prompt_ids + row.chosen_ids and "prompt_input_ids" in row
    assert {"trl", "cpo"} <= set(cpo.model.model_tags)
    rm = RewardTrainer(model_dir, args=args_of(RewardConfig, tmp_path / "rm"), train_dataset=train)
    row = rm.train_dataset[0]
    assert row["rejected_ids"] == row.prompt_ids + row.rejected_ids and row["chosen_ids"][:len(row.prompt_ids)] == \
        row.prompt_ids
    assert {"trl", "reward-trainer"} <= set(rm.model.model_tags)
    new = dpo.evaluate(eval_dataset=Dataset.from_list(standard(2, 8)))  # rows of a set given later too
    assert math.isfinite(new["eval_loss"])


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_reward_model_lora_trains_what_peft_chooses(model_dir, tmp_path, task_type):
    """LoraConfig(): the head stays frozen (peft's plain LoRA); task SEQ_CLS: peft trains a copy of it."""
    from datasets import Dataset
    from peft import LoraConfig

    from preftune.trl import RewardConfig, RewardTrainer

    trainer = RewardTrainer(model_dir, args=args_of(RewardConfig, tmp_path, learning_rate=0.05),
                            train_dataset=Dataset.from_list(standard(4)),
                            peft_config=LoraConfig(task_type=task_type, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    head_trained = {n for n in trainable if "score" in n}
    if task_type is None:
        assert not head_trained and all("lora_" in n for n in trainable)
        assert torch.equal(before["base_model.model.score.weight"],
                           trainer.model.get_parameter("base_model.model.score.weight"))
    else:
        assert head_trained and all("modules_to_save" in n for n in head_trained)
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert {n for n in trainable if "lora_B" in n} <= changed and changed <= trainable


def test_chat_template_path_sets_the_tokenizers_template(model_dir, tmp_path):
    from datasets import Dataset

    from preftune.config import ConfigError
    from preftune.trl import DPOConfig, DPOTrainer

    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}")
    data = [{"prompt": [{"role": "user", "content": f"hi {i}"}], "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": f"no {i}"}]} for i in range(4)]
    trainer = DPOTrainer(model_dir, args=args_of(DPOConfig, tmp_path / "out", chat_template_path=str(template)),
                         train_dataset=Dataset.from_list(data))
    assert trainer.processing_class.chat_template == template.read_text()
    assert trainer.processing_class.decode(trainer.train_dataset[0]["prompt_ids"]).endswith("[user]hi 0[assistant]")
    with pytest.raises(ConfigError, match="chat_template_path"):
        DPOTrainer(model_dir, args=args_of(DPOConfig, tmp_path / "bad", chat_template_path=str(tmp_path / "none")),
                   train_dataset=Dataset.from_list(data))


def test_float16_weights_at_lr_0_1_diverge_in_trl_too_preftune_stops(model_dir, tmp_path):
    """TRL's ``test_train_model_dtype`` setting (float16 weights, lr 0.1) on a tiny Llama: TRL's run goes
    non-finite as well (grad_norm NaN at step 4, every weight NaN after it; the logged loss reads 0.0
    because transformers' ``logging_nan_inf_filter`` hides it); preftune stops at that step instead
    (NonFiniteError naming it), a deliberate difference (``docs/python-api.md``)."""
    import trl
    from datasets import Dataset

    from preftune.errors import NonFiniteError
    from preftune.trl import DPOConfig, DPOTrainer

    rows = Dataset.from_list([{"prompt": f"Question {i}: what is the colour of item {i}?",
                               "chosen": f" It is blue, number {i}.", "rejected": f" Red{i} maybe not sure."}
                              for i in range(24)])
    common = dict(model_init_kwargs={"dtype": torch.float16}, learning_rate=0.1, report_to="none", max_steps=4,
                  per_device_train_batch_size=8, logging_steps=1, save_strategy="no", bf16=False)
    ours = DPOTrainer(model_dir, args=DPOConfig(output_dir=str(tmp_path / "ours"), **common), train_dataset=rows)
    with pytest.raises(NonFiniteError, match="at step 4"):
        ours.train()
    theirs = trl.DPOTrainer(model=model_dir, train_dataset=rows,
                            args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, **common))
    theirs.train()
    assert math.isnan(theirs.state.log_history[3]["grad_norm"]) and theirs.state.log_history[3]["loss"] == 0.0
    assert all(not torch.isfinite(p).all() for p in theirs.model.parameters())
