"""End-to-end training through the CLI and the recipe on a tiny random model."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from preftune.cli import main
from preftune.cli_args import parse_groups
from preftune.train import resolve_checkpoint, save, setup, train

GOLDEN = Path(__file__).parent / "golden" / "cpo_tiny_trajectory.json"


def base_flags(model_dir, out, *extra):
    return ["--model_name_or_path", model_dir, "--output_dir", str(out), "--use_peft", "--lora_r", "4",
            "--lora_alpha", "8", "--max_steps", "4", "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--learning_rate", "1e-2", "--max_length", "256", "--max_prompt_length", "128", "--seed", "3",
            "--save_strategy", "no", "--dataloader_num_workers", "0", *extra]


def log_history(out):
    return json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]


def test_train_cli_writes_everything_and_config_repeats(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *base_flags(tiny_model_dir, out, "--eval_ratio", "0.2", "--eval_strategy", "steps",
                                      "--eval_steps", "2", "--eval_on_start", "true")]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer_state.json",
                 "train_results.json", "preftune_config.yaml", "eval_results.json"):
        assert (out / name).is_file(), name
    history = log_history(out)
    train_logs = [h for h in history if "loss" in h]
    eval_logs = [h for h in history if "eval_loss" in h]
    assert len(train_logs) == 4 and len(eval_logs) >= 3  # on start, step 2, step 4 (+ final)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "nll_loss"):
        assert key in train_logs[0] and f"eval_{key}" in eval_logs[0]
    assert eval_logs[0]["step"] == 0
    # the resolved config repeats the run: same flags, same numbers
    out2 = tmp_path / "again"
    assert main(["train", str(out / "preftune_config.yaml"), "--output_dir", str(out2)]) == 0
    losses1 = [h["loss"] for h in train_logs]
    losses2 = [h["loss"] for h in log_history(out2) if "loss" in h]
    assert losses1 == pytest.approx(losses2, abs=1e-6)


@pytest.mark.parametrize("loss", ["cpo", "simpo", "cpo-simpo", "orpo", "dpo", "sft"])
def test_every_loss_trains(tiny_model_dir, tmp_path, loss):
    out = tmp_path / loss
    assert main(["train", *base_flags(tiny_model_dir, out, "--loss", loss, "--max_steps", "2")]) == 0
    logs = [h for h in log_history(out) if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert logs[0]["loss"] != logs[1]["loss"]  # the adapter moved
    if loss == "dpo":
        assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1


def test_dpo_reference_paths_agree(tiny_model_dir, tmp_path, caplog, monkeypatch):
    """Precomputed reference log-probs (cached) and on-the-fly reference (adapters disabled) give one trajectory."""
    monkeypatch.setenv("PREFTUNE_REF_CACHE", str(tmp_path / "ref-cache"))
    runs = {}
    caplog.set_level("INFO", logger="preftune.engine")
    for name, flag in (("pre", "true"), ("live", "false"), ("cached", "true")):
        caplog.clear()
        out = tmp_path / name
        assert main(["train", *base_flags(tiny_model_dir, out, "--loss", "dpo", "--max_steps", "3",
                                          "--precompute_ref_log_probs", flag)]) == 0
        runs[name] = [h["loss"] for h in log_history(out) if "loss" in h]
        sources = [r.getMessage() for r in caplog.records if "reference log-probs" in r.getMessage()]
        assert len(sources) == (0 if name == "live" else 1)
        if sources:
            assert (": cache " in sources[0]) == (name == "cached"), sources
    assert runs["pre"] == pytest.approx(runs["live"], abs=1e-5)
    assert runs["cached"] == pytest.approx(runs["pre"], abs=1e-7)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_latest_matches_uninterrupted(tiny_model_dir, tmp_path):
    flags = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--lora_dropout", "0.1",
             "--per_device_train_batch_size", "2"]
    full = tmp_path / "full"
    assert main(["train", *base_flags(tiny_model_dir, full, *flags)]) == 0

    part = tmp_path / "part"
    run = setup(parse_groups(base_flags(tiny_model_dir, part, *flags)))
    run.trainer.add_callback(StopAt(3))
    train(run)
    assert resolve_checkpoint("latest", str(part)).endswith("checkpoint-3")
    assert not (part / "checkpoint-6").exists()
    assert main(["train", *base_flags(tiny_model_dir, part, *flags, "--resume_from_checkpoint", "latest")]) == 0

    a = load_file(full / "adapter_model.safetensors")
    b = load_file(part / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, diff
    # and training did move the adapter away from its initialisation (lora_B starts at zero)
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 0


def test_golden_trajectory(tiny_model_dir, tmp_path):
    """A pinned-seed 6-step CPO run on the tiny model; the losses and margins must not drift."""
    out = tmp_path / "golden"
    assert main(["train", *base_flags(tiny_model_dir, out, "--max_steps", "6")]) == 0
    logs = [h for h in log_history(out) if "loss" in h]
    got = {"loss": [h["loss"] for h in logs], "rewards/margins": [h["rewards/margins"] for h in logs]}
    if not GOLDEN.exists():  # written once, then committed; never rewritten by the test
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1))
        pytest.skip("golden trajectory written; commit it")
    want = json.loads(GOLDEN.read_text())
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-4)
    assert got["rewards/margins"] == pytest.approx(want["rewards/margins"], abs=1e-4)


def test_evaluate_cli_base_and_adapter(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *base_flags(tiny_model_dir, out, "--max_steps", "6", "--learning_rate", "5e-2")]) == 0
    capsys.readouterr()
    base_json, tuned_json = tmp_path / "base.json", tmp_path / "tuned.json"
    common = ["--model", tiny_model_dir, "--max_length", "256", "--max_prompt_length", "128"]
    assert main(["evaluate", *common, "--output_json", str(base_json)]) == 0
    assert main(["evaluate", *common, "--adapter", str(out), "--output_json", str(tuned_json)]) == 0
    base, tuned = json.loads(base_json.read_text()), json.loads(tuned_json.read_text())
    assert base["num_pairs"] == tuned["num_pairs"] > 40
    assert 0.0 <= base["rewards/accuracies"] <= 1.0
    assert tuned["rewards/margins"] != pytest.approx(base["rewards/margins"])


def test_cli_errors_are_clear(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--bta", "0.1"]) == 2
    assert "did you mean --beta" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    assert main(["train", *base_flags(tiny_model_dir, tmp_path / "x", "--dataset", str(bad))]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err and "rejected" in err and "Traceback" not in err
    assert main(["train", "--loss", "ppo"]) == 2
    assert "cpo" in capsys.readouterr().err
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_yaml_and_flags_merge(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss: simpo\nbeta: 2.5\nuse_peft: true\nlora_target_modules: [q_proj, v_proj]\n")
    groups = parse_groups([str(cfg), "--beta", "3.0", "--bf16", "false"])
    model_args, peft_args, data_args, loss_args, engine_args, training_args = groups
    assert loss_args.loss == "simpo" and loss_args.beta == 3.0
    assert peft_args.use_peft and peft_args.lora_target_modules == ["q_proj", "v_proj"]
    assert training_args.bf16 is False
    cfg.write_text("los: simpo\n")
    with pytest.raises(ValueError, match="did you mean 'loss'"):
        parse_groups([str(cfg)])


def test_save_writes_resolved_config(tiny_model_dir, tmp_path):
    run = setup(parse_groups(base_flags(tiny_model_dir, tmp_path / "s", "--max_steps", "1")))
    save(run, train(run))
    text = (tmp_path / "s" / "preftune_config.yaml").read_text()
    assert "loss: cpo" in text and "max_steps: 1" in text and f"model_name_or_path: {tiny_model_dir}" in text


@pytest.mark.parametrize("precompute", ["true", "false"])
def test_dpo_continuing_adapter_uses_its_start_as_reference(tiny_model_dir, tmp_path, monkeypatch, precompute):
    """With --peft_model_id the DPO reference is that adapter as loaded, not the bare base model:
    at the first step policy == reference, so every reward is 0 (adapter dropout 0: with dropout the
    training forward is stochastic and differs from the reference by construction)."""
    monkeypatch.setenv("PREFTUNE_REF_CACHE", str(tmp_path / "ref-cache"))
    first = tmp_path / "first"
    assert main(["train", *base_flags(tiny_model_dir, first, "--loss", "sft", "--max_steps", "3",
                                      "--learning_rate", "5e-2", "--lora_dropout", "0")]) == 0
    out = tmp_path / "dpo"
    assert main(["train", *base_flags(tiny_model_dir, out, "--loss", "dpo", "--max_steps", "2",
                                      "--peft_model_id", str(first), "--precompute_ref_log_probs", precompute)]) == 0
    logs = [h for h in log_history(out) if "loss" in h]
    assert logs[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert logs[0]["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    # the continued adapter really differs from the base model: evaluated with DPO against the base
    # (adapter disabled) its rewards are far from 0
    assert main(["evaluate", "--model", tiny_model_dir, "--adapter", str(first), "--loss", "dpo",
                 "--max_length", "256", "--max_prompt_length", "128", "--output_json", str(tmp_path / "e.json")]) == 0
    assert abs(json.loads((tmp_path / "e.json").read_text())["rewards/chosen"]) > 0.05
    saved = load_file(out / "adapter_model.safetensors")
    assert not any("reference" in k for k in saved)


def test_group_by_length_sampler_on_padded_path(tiny_model_dir, tmp_path):
    out = tmp_path / "gbl"
    assert main(["train", *base_flags(tiny_model_dir, out, "--max_steps", "2", "--share_prompt", "false",
                                      "--padding_free", "false", "--train_sampling_strategy", "group_by_length")]) == 0
    assert len([h for h in log_history(out) if "loss" in h]) == 2


def test_plot_and_side_by_side_generations(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *base_flags(tiny_model_dir, out, "--max_steps", "3", "--eval_ratio", "0.1",
                                      "--eval_strategy", "steps", "--eval_steps", "3")]) == 0
    assert main(["plot", str(out)]) == 0
    png = out / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    capsys.readouterr()
    rows = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", tiny_model_dir, "--adapter", str(out), "--num_prompts", "2",
                 "--max_new_tokens", "6", "--output_jsonl", str(rows)]) == 0
    text = capsys.readouterr().out
    assert text.count("**base**") == 2 and text.count("**adapter**") == 2 and "**chosen**" in text
    lines = [json.loads(x) for x in rows.read_text().splitlines()]
    assert len(lines) == 2 and all(set(r) >= {"prompt", "base", "adapter", "chosen", "rejected"} for r in lines)


def test_evaluate_reuses_reference_logps_of_training(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PREFTUNE_REF_CACHE", str(tmp_path / "ref-cache"))
    caplog.set_level("INFO", logger="preftune.engine")
    out = tmp_path / "dpo"
    assert main(["train", *base_flags(tiny_model_dir, out, "--loss", "dpo", "--max_steps", "1",
                                      "--eval_ratio", "0.25")]) == 0
    caplog.clear()
    assert main(["evaluate", "--model", tiny_model_dir, "--adapter", str(out), "--loss", "dpo", "--split", "eval",
                 "--eval_ratio", "0.25", "--seed", "3", "--max_length", "256", "--max_prompt_length", "128"]) == 0
    messages = [r.getMessage() for r in caplog.records if "reference log-probs" in r.getMessage()]
    assert len(messages) == 1 and ": cache (0 computed" in messages[0], messages
