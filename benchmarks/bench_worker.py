"""One benchmark measurement, run in its own process: ``python bench_worker.py SPEC.json OUT.json``.

Kinds of ``spec["kind"]``:

* ``train``: build one trainer (``tool`` = ``preftune-cpo``, ``preftune-dpo``, ``trl-cpo``,
  ``trl-dpo``, ``trl-dpo-pre``), train ``warmup + steps`` steps of ``batch`` pairs in data order
  (sequential sampler) and record per-step wall time, the loss each step computed, the tokens
  each step processed (real and padded), and the peak RSS during training (``VmHWM`` after
  resetting it through ``/proc/self/clear_refs`` once the trainer is built).
* ``matmul``: the fp32 ``torch.mm`` rate (FLOP/s) of SmolLM2-135M-shaped products.
* ``vocab``: peak RSS of one CPO training step (``tool`` = ``preftune`` or ``trl``) on a tiny
  random Llama with vocabulary ``vocab`` and a fixed synthetic token batch.

Everything the driver needs comes back as JSON in OUT.json.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


# ---- memory ------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0, ``echo 5 > /proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


# ---- trainers ----------------------------------------------------------------------------------
class StepRecorder:
    """Wraps ``trainer.compute_loss`` and adds a callback: per-step time, loss and tokens."""

    def __init__(self, trainer, warmup: int, profile_step: int | None = None):
        from transformers import TrainerCallback

        self.times, self.cpu, self.losses, self.real, self.padded = [], [], [], [], []
        self.warmup = warmup
        self.profile_step, self.profile = profile_step, None
        rec = self
        original = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            out = original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if model.training:
                loss = out[0] if isinstance(out, tuple) else out
                rec.losses.append(float(loss.detach()))
                rec.real.append(int(_real_tokens(inputs)))
                rec.padded.append(int(_padded_tokens(inputs)))
            return out

        trainer.compute_loss = compute_loss

        class _Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if rec.profile_step is not None and len(rec.times) == rec.profile_step:
                    rec.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    rec.profile.__enter__()
                rec._t0, rec._c0 = time.perf_counter(), time.process_time()

            def on_step_end(self, args, state, control, **kw):
                rec.times.append(time.perf_counter() - rec._t0)
                rec.cpu.append(time.process_time() - rec._c0)  # CPU seconds of all threads: robust to other jobs
                if rec.profile is not None and len(rec.times) == rec.profile_step + 1:
                    rec.profile.__exit__(None, None, None)
                if len(rec.times) == rec.warmup:
                    rec.rss_after_warmup = rss_mb()

        trainer.add_callback(_Timer())


def _real_tokens(inputs) -> int:
    if "segment_ids" in inputs:  # preftune layout: -1 marks padding
        return int((inputs["segment_ids"] >= 0).sum())
    if "concatenated_attention_mask" in inputs:
        return int(inputs["concatenated_attention_mask"].sum())
    if "chosen_attention_mask" in inputs:  # TRL CPO: chosen / rejected rows padded separately
        return int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum())
    return int(inputs["attention_mask"].sum())


def _padded_tokens(inputs) -> int:
    if "segment_ids" in inputs:
        return inputs["input_ids"].numel()
    if "chosen_input_ids" in inputs:  # TRL CPO pads chosen and rejected to one width before the forward
        rows = inputs["chosen_input_ids"].shape[0] + inputs["rejected_input_ids"].shape[0]
        return rows * max(inputs["chosen_input_ids"].shape[1], inputs["rejected_input_ids"].shape[1])
    return inputs["input_ids"].numel()


def _common_training_kwargs(spec: dict, out_dir: str) -> dict:
    """``spec["checkpointing"]``: True / False, or None for the tool's default (TRL: on)."""
    kwargs = dict(output_dir=out_dir, per_device_train_batch_size=spec["batch"],
                  max_steps=spec["warmup"] + spec["steps"], learning_rate=5e-6, logging_steps=1000, save_strategy="no",
                  report_to="none", seed=0, train_sampling_strategy="sequential", dataloader_num_workers=0, bf16=False,
                  fp16=False, disable_tqdm=True, remove_unused_columns=False)
    if spec["checkpointing"] is not None:
        kwargs["activation_checkpointing"] = spec["checkpointing"]
    return kwargs


def build_preftune(spec: dict, out_dir: str):
    """preftune trainer through the CLI path: parse_groups → train.setup."""
    from preftune.cli_args import parse_groups
    from preftune.train import setup

    loss = spec["tool"].split("-", 1)[1]
    argv = ["--dataset", spec["preftune_file"], "--loss", loss, "--max_length", str(spec["max_length"]),
            "--max_prompt_length", str(spec["max_prompt_length"]), "--output_dir", out_dir,
            "--per_device_train_batch_size", str(spec["batch"]), "--max_steps", str(spec["warmup"] + spec["steps"]),
            "--learning_rate", "5e-6", "--logging_steps", "1000", "--save_strategy", "no", "--report_to", "none",
            "--seed", "0", "--train_sampling_strategy", "sequential", "--disable_tqdm", "true"]
    if spec["checkpointing"] is not None:  # None: preftune's default (layers checkpointed from the memory budget)
        argv += ["--activation_checkpointing", "true" if spec["checkpointing"] else "false"]
    if spec["lora"]:
        argv += ["--use_peft", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", str(spec.get("lora_dropout", 0.0))]
    argv += list(spec.get("preftune_args", []))
    run = setup(parse_groups(argv))
    return run.trainer, [p for p in run.trainer.train_dataset.pairs]


def _lora_config(dropout: float = 0.0):
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear",
                      task_type="CAUSAL_LM", bias="none")


def build_trl(spec: dict, out_dir: str):
    """TRL 1.16 CPOTrainer / DPOTrainer on the same strings, model and LoRA settings."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.config import ModelArguments
    from preftune.models import resolve_model_source

    source = resolve_model_source(ModelArguments())
    tok = AutoTokenizer.from_pretrained(source)
    # TRL's CPO tokenize_row prepends tokenizer.bos_token_id to every prompt that does not start with it, although
    # the SmolLM2 tokenizer never adds a BOS itself (its bos_token <|im_start|> is a chat marker). preftune follows
    # the tokenizer (no BOS), so the BOS is unset here to give both tools the same tokens.
    tok.bos_token = None
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    pairs = json.loads(Path(spec["pairs_file"]).read_text())
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    common = _common_training_kwargs(spec, out_dir)
    peft_config = _lora_config(spec.get("lora_dropout", 0.0)) if spec["lora"] else None
    if spec["tool"] == "trl-cpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common, max_length=spec["max_length"], beta=0.1, cpo_alpha=1.0, loss_type="sigmoid")
        trainer = CPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config)
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, max_length=spec["max_length"], beta=0.1, loss_type=["sigmoid"],
                         precompute_ref_log_probs=spec["tool"] == "trl-dpo-pre", precompute_ref_batch_size=spec["batch"])
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config)
    return trainer, pairs


def token_check(tool: str, trainer, pairs) -> dict:
    """Compare, pair by pair, the token ids the tool will train on with preftune's."""
    ds = trainer.train_dataset
    mismatched = []
    for i, p in enumerate(pairs):
        ref = (list(p["prompt_ids"]), list(p["chosen_ids"]), list(p["rejected_ids"]))
        row = ds[i]
        if tool == "trl-cpo":
            n_prompt = len(row["chosen_labels"]) - len([t for t in row["chosen_labels"] if t != -100])
            got = (row["chosen_input_ids"][:n_prompt], row["chosen_input_ids"][n_prompt:],
                   row["rejected_input_ids"][n_prompt:])
        else:  # DPO: the collator cuts prompt+completion to max_length (keep_start)
            m = trainer.args.max_length
            got = (row["prompt_ids"], (row["prompt_ids"] + row["chosen_ids"])[:m][len(row["prompt_ids"]):],
                   (row["prompt_ids"] + row["rejected_ids"])[:m][len(row["prompt_ids"]):])
        if tuple(map(list, got)) != ref:
            mismatched.append(i)
    return {"pairs_checked": len(pairs), "pairs_with_different_tokens": len(mismatched),
            "first_mismatches": mismatched[:5]}


def run_train(spec: dict) -> dict:
    os.environ.setdefault("PREFTUNE_REF_CACHE", tempfile.mkdtemp(prefix="ptbench-ref-"))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ptbench-out-") as out_dir:
        if spec["tool"].startswith("preftune"):
            trainer, pairs = build_preftune(spec, out_dir)
            ref_pairs = json.loads(Path(spec["pairs_file"]).read_text())
            same = sum(p.prompt_ids == r["prompt_ids"] and p.chosen_ids == r["chosen_ids"]
                       and p.rejected_ids == r["rejected_ids"] for p, r in zip(pairs, ref_pairs))
            check = {"pairs_checked": len(ref_pairs), "pairs_with_different_tokens": len(ref_pairs) - same}
            logical = [p.num_tokens_logical for p in pairs]
            unique = [p.num_tokens_unique for p in pairs]
        else:
            trainer, pairs = build_trl(spec, out_dir)
            check = token_check(spec["tool"], trainer, pairs)
            logical = [2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]
            unique = [len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]
        setup_s = time.perf_counter() - t0
        n_params = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n)
        rec = StepRecorder(trainer, spec["warmup"], spec.get("profile_step"))
        rss_before = rss_mb()
        reset_peak_rss()
        trainer.train()
        peak = peak_rss_mb()
        layers = _checkpointed_layers(trainer.model)
    b = spec["batch"]
    out = {"setup_s": setup_s, "step_s": rec.times, "cpu_s": rec.cpu, "loadavg": os.getloadavg(), "losses": rec.losses, "real_tokens": rec.real,
           "padded_tokens": rec.padded,
           "logical_tokens": [sum(logical[i * b:(i + 1) * b]) for i in range(len(rec.times))],
           "unique_tokens": [sum(unique[i * b:(i + 1) * b]) for i in range(len(rec.times))],
           "rss_before_train_mb": rss_before, "rss_after_warmup_mb": getattr(rec, "rss_after_warmup", None),
           "peak_rss_train_mb": peak, "n_params": n_params, "token_check": check,
           "threads": torch.get_num_threads(), "checkpointed_layers": layers}
    if rec.profile is not None:
        out["profile"] = profile_table(rec.profile)
    return out


def _checkpointed_layers(model) -> list[int]:
    """[checkpointed, total] decoder layers at the end of training (preftune: of its last step)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return [sum(bool(getattr(m, "gradient_checkpointing", False)) for m in layers), len(layers)]


def profile_table(prof, top: int = 15) -> list[dict]:
    """Top operators by self CPU time: name, self seconds, share, calls."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in rows]


# ---- matmul rate -------------------------------------------------------------------------------
def run_matmul(spec: dict) -> dict:
    """fp32 GEMM rate for the shapes of a SmolLM2-135M layer (tokens × 576 × {576, 192, 1536})."""
    tokens, seconds = spec.get("tokens", 2048), spec.get("seconds", 4.0)
    shapes = [(tokens, 576, 576), (tokens, 576, 192), (tokens, 576, 1536), (tokens, 1536, 576)]
    flops = elapsed = 0.0
    per_shape = {}
    for m, k, n in shapes:
        a, w = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, w)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / len(shapes):
            torch.mm(a, w)
            reps += 1
        dt = time.perf_counter() - t0
        per_shape[f"{m}x{k}x{n}"] = 2 * m * k * n * reps / dt
        flops, elapsed = flops + 2 * m * k * n * reps, elapsed + dt
    return {"flops_per_s": flops / elapsed, "per_shape": per_shape, "threads": torch.get_num_threads()}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    # Same CPU numerics for both tools: denormal floats flushed to zero (preftune does this by
    # default, --flush_denormal; without it a LoRA CPO step was 7x slower here, for either tool).
    torch.set_flush_denormal(True)
    if spec["kind"] == "train":
        result = run_train(spec)
    elif spec["kind"] == "matmul":
        result = run_matmul(spec)
    elif spec["kind"] == "vocab":
        from bench_vocab import run_vocab

        result = run_vocab(spec)
    else:
        raise ValueError(f"unknown kind {spec['kind']!r}")
    result["peak_rss_process_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
