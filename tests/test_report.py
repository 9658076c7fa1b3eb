"""report.html, metrics.png and the logging default on tiny runs (issue 26)."""

import json
import re
from pathlib import Path

from preftune.cli import main


def small_data(tmp_path) -> str:
    """16 short pairs (the demo set is slow on a busy 2-core machine)."""
    path = tmp_path / "pairs.jsonl"
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    with open(path, "w") as fh:
        for i in range(16):
            a, b = words[i % 8], words[(i * 3 + 1) % 8]
            fh.write(json.dumps({"prompt": f"Name thing {i}: ", "chosen": f"a {a} {b}.", "rejected": f"no {b}"}) + "\n")
    return str(path)


def flags(model_dir, out, *extra):
    return ["--model_name_or_path", model_dir, "--output_dir", str(out), "--dataset", small_data(out.parent),
            "--use_peft", "--lora_r", "4",
            "--lora_alpha", "8", "--per_device_train_batch_size", "4", "--learning_rate", "5e-2",
            "--max_length", "128", "--max_prompt_length", "64", "--seed", "3", "--dataloader_num_workers", "0",
            "--report_to", "none", *extra]


def sections(html: str) -> set[str]:
    return set(re.findall(r'<section id="([a-z]+)"', html))


def test_dpo_run_writes_report_with_every_section(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "dpo"
    assert main(["train", *flags(tiny_model_dir, out, "--loss", "dpo", "--max_steps", "4", "--eval_ratio", "0.25",
                                 "--save_strategy", "steps", "--save_steps", "2", "--report_generations", "2",
                                 "--per_device_eval_batch_size", "4")]) == 0
    page = out / "report.html"
    html = page.read_text()
    assert page.stat().st_size < 2 * 1024 * 1024
    assert not re.search(r"https?://", html)  # offline: no resource (nor link) on the network
    assert "<script" not in html
    assert sections(html) == {"summary", "curves", "margins", "data", "generations", "config"}
    assert html.count('src="data:image/png;base64,') >= 6  # curves, margins, lengths
    assert "loss: dpo" in html  # the resolved configuration
    extras = json.loads((out / "report_data.json").read_text())
    n_eval = json.loads((out / "eval_results.json").read_text())["eval_num_pairs"] \
        if "eval_num_pairs" in json.loads((out / "eval_results.json").read_text()) else None
    before, after = extras["eval_margins"]["before"], extras["eval_margins"]["after"]
    assert len(before) == len(after) > 0 and (n_eval is None or len(before) == n_eval)
    assert max(abs(m) for m in before) < 1e-6  # DPO at step 0: the policy is its reference (LoRA B = 0)
    assert max(abs(m) for m in after) > 1e-4  # training moved the margins
    assert len(extras["generations"]) == 2 and {"base", "adapter", "chosen", "rejected"} <= set(extras["generations"][0])
    assert set(extras["lengths"]) == {"prompt", "chosen", "rejected"} and extras["lengths"]["prompt"]
    assert (out / "metrics.png").stat().st_size > 1000
    # no --logging_steps: about 50 points per run, i.e. every step on a 4-step run
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]


def test_report_written_at_each_save(tiny_model_dir, tmp_path):
    """A checkpoint leaves report.html and metrics.png in the output directory before the run ends."""
    import preftune.report.hook as hook
    from preftune.train import run_config

    seen = []

    original = hook.ReportHook._on_checkpoint

    def spy(self, checkpoint):
        original(self, checkpoint)
        seen.append((checkpoint.name, (Path(self.output_dir) / "report.html").is_file(),
                     (Path(self.output_dir) / "metrics.png").is_file()))

    hook.ReportHook._on_checkpoint = spy
    try:
        out = tmp_path / "cpo"
        run_config({"model_name_or_path": tiny_model_dir, "output_dir": str(out), "use_peft": True, "lora_r": 4,
                    "dataset": small_data(tmp_path),
                    "max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 1, "max_length": 128, "max_prompt_length": 64,
                    "report_to": "none", "logging_steps": 1, "dataloader_num_workers": 0})
    finally:
        hook.ReportHook._on_checkpoint = original
    assert seen == [("checkpoint-1", True, True), ("checkpoint-2", True, True)]
    html = (out / "report.html").read_text()
    assert sections(html) == {"summary", "curves", "margins", "data", "config"}  # no eval split, no generations
    assert "No eval split" in html


def test_logging_default_only_when_not_given(tmp_path):
    from preftune.cli_args import parse_groups
    from preftune.train import apply_logging_default, logging_steps_given

    argv = ["--output_dir", str(tmp_path / "a")]
    groups = parse_groups(argv)
    apply_logging_default(groups, logging_steps_given(argv))
    assert groups.training.logging_steps == 0.02  # transformers: ceil(max_steps * 0.02) steps per log
    argv = ["--output_dir", str(tmp_path / "b"), "--logging_steps", "10"]
    groups = parse_groups(argv)
    apply_logging_default(groups, logging_steps_given(argv))
    assert groups.training.logging_steps == 10
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("logging_steps: 10\n")
    assert logging_steps_given([str(yaml_file)]) and not logging_steps_given([str(tmp_path / "missing.yaml")])


def test_report_command_compares_runs(tmp_path, capsys):
    """`preftune report A B` draws one page from the files of two runs (curves of both, one column each)."""
    for name, slope in (("cpo", -0.1), ("sft", -0.05)):
        d = tmp_path / name
        d.mkdir()
        history = [{"step": s, "loss": 1 + slope * s, "rewards/accuracies": 0.5 + 0.05 * s} for s in range(1, 6)]
        (d / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        (d / "preftune_config.yaml").write_text(f"loss: {name}\n")
    assert main(["report", str(tmp_path / "cpo"), str(tmp_path / "sft"), "--out", str(tmp_path / "both.html")]) == 0
    html = (tmp_path / "both.html").read_text()
    assert "2 runs compared" in html and "loss: cpo" in html and "loss: sft" in html
    summary = html[html.index('id="summary"'):html.index('id="curves"')]
    assert "<th>cpo: train</th><th>cpo: eval</th><th>sft: train</th><th>sft: eval</th>" in summary
    assert "<td>loss</td><td class=\"num\">0.5</td><td class=\"num\"></td><td class=\"num\">0.75</td>" in summary
    assert main(["report", str(tmp_path / "nothing")]) == 2  # not a run directory: one line, exit 2
    assert "not found" in capsys.readouterr().err


def test_progress_bars_follow_disable_tqdm(monkeypatch):
    """`--disable_tqdm true` sets TQDM_DISABLE=1 for the run; preftune's bars (reference pass, margins) honour it."""
    from preftune.engine.reference import progress_bar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    bar = progress_bar(3, "reference log-probs")
    assert not bar.disable and bar.total == 3
    bar.close()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    bar = progress_bar(3, "reference log-probs")
    assert bar.disable
    bar.close()


def test_known_noise_filtered_and_nothing_else(caplog):
    """bitsandbytes' kernels-community line and transformers' is_gradient_checkpointing FutureWarning are
    dropped; other warnings of the same loggers / category still show."""
    import logging
    import warnings

    from preftune.cli import _quiet_known_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # pytest's own configuration ignores FutureWarning
        _quiet_known_warnings()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level("WARNING"):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        log.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
