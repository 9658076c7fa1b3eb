"""Reward models, preftune ``--loss rm`` vs TRL 1.16 ``RewardTrainer``: throughput and peak RSS, A/B in one run.

    .venv/bin/python benchmarks/bench_rm.py            # measurement → benchmarks/results/bench_rm.json
    .venv/bin/python benchmarks/bench_rm.py --quick    # smoke run: 2 pairs, 1 + 1 steps, one round

Same model (SmolLM2-135M-Instruct as a sequence classifier with one label, fp32, SDPA), same LoRA
(r=16, alpha 32, dropout 0, all linear layers of the body, the ``score`` head trained fully), same
pairs with the same tokens (HH-RLHF harmless-base, ``bench_data``; TRL gets the token ids
pre-tokenised, so neither tool re-tokenises), same batch, steps and sequential order, same
activation checkpointing (``--checkpointing``, on by default as in TRL's ``RewardConfig``); each
tool otherwise keeps its defaults (preftune: shared prompt + padding-free packing; TRL: right-padded
rows). Every measurement runs in its own process (``python bench_rm.py --worker SPEC OUT``); the
two tools alternate within each round, and rounds repeat. A watchdog kills a run whose RSS passes
``--mem-limit-gb``. Reported: seconds per measured step, pairs/s and tokens/s, peak RSS during
training (VmHWM reset after the trainer is built), the first-step loss of each tool (same initial
head: both load under seed 0) and the token check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

TOOLS = ("trl-rm", "preftune-rm")


# ---- worker (one measurement per process) --------------------------------------------------------
def _build_trl(spec: dict, out_dir: str):
    """TRL RewardTrainer on the benchmark pairs, pre-tokenised (prompt + completion ids)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    from preftune.config import ModelArguments
    from preftune.engine.kinds.value_head import reward_model_loading
    from preftune.models import resolve_model_source

    source = resolve_model_source(ModelArguments())
    tok = AutoTokenizer.from_pretrained(source)
    set_seed(0)  # the new head's initialisation, as preftune's setup seeds before loading
    with reward_model_loading():
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32,
                                                                   attn_implementation="sdpa")
    model.config.use_cache = False
    pairs = json.loads(Path(spec["pairs_file"]).read_text())
    data = Dataset.from_list([{"chosen_ids": p["prompt_ids"] + p["chosen_ids"],
                               "rejected_ids": p["prompt_ids"] + p["rejected_ids"]} for p in pairs])
    args = RewardConfig(output_dir=out_dir, per_device_train_batch_size=spec["batch"],
                        max_steps=spec["warmup"] + spec["steps"], learning_rate=5e-6, logging_steps=1000,
                        save_strategy="no", report_to="none", seed=0, train_sampling_strategy="sequential",
                        dataloader_num_workers=0, bf16=False, fp16=False, disable_tqdm=True,
                        max_length=spec["max_length"],
                        **({} if spec["checkpointing"] is None else {"gradient_checkpointing": spec["checkpointing"]}))
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=spec.get("lora_dropout", 0.0), target_modules="all-linear", task_type="SEQ_CLS",
                             modules_to_save=["score"], bias="none")
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config)
    n_kept = len(trainer.train_dataset)
    check = {"pairs_checked": len(pairs), "pairs_with_different_tokens": sum(
        list(row["chosen_ids"]) != p["prompt_ids"] + p["chosen_ids"]
        or list(row["rejected_ids"]) != p["prompt_ids"] + p["rejected_ids"]
        for row, p in zip(trainer.train_dataset, pairs)) + (len(pairs) - n_kept)}
    return trainer, pairs, check


def _build_preftune(spec: dict, out_dir: str):
    from bench_worker import build_preftune

    trainer, pairs = build_preftune({**spec, "tool": "preftune-rm", "lora": True}, out_dir)
    ref = json.loads(Path(spec["pairs_file"]).read_text())
    same = sum(p.prompt_ids == r["prompt_ids"] and p.chosen_ids == r["chosen_ids"] and p.rejected_ids == r["rejected_ids"]
               for p, r in zip(pairs, ref))
    return trainer, ref, {"pairs_checked": len(ref), "pairs_with_different_tokens": len(ref) - same}


def run_worker_spec(spec: dict) -> dict:
    import torch
    from bench_worker import StepRecorder, peak_rss_mb, reset_peak_rss, rss_mb

    torch.set_flush_denormal(True)  # same CPU numerics for both tools (preftune's default)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ptbench-rm-") as out_dir:
        build = _build_preftune if spec["tool"] == "preftune-rm" else _build_trl
        trainer, pairs, check = build(spec, out_dir)
        setup_s = time.perf_counter() - t0
        rec = StepRecorder(trainer, spec["warmup"])
        rss_before = rss_mb()
        reset_peak_rss()
        trainer.train()
        peak = peak_rss_mb()
    b = spec["batch"]
    logical = [2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]
    return {"setup_s": setup_s, "step_s": rec.times, "cpu_s": rec.cpu, "losses": rec.losses,
            "real_tokens": rec.real, "padded_tokens": rec.padded,
            "logical_tokens": [sum(logical[i * b:(i + 1) * b]) for i in range(len(rec.times))],
            "rss_before_train_mb": rss_before, "peak_rss_train_mb": peak, "token_check": check,
            "threads": torch.get_num_threads(), "loadavg": os.getloadavg()}


# ---- driver --------------------------------------------------------------------------------------
def _mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_one(spec: dict, limit_gb: float, work: Path, log) -> dict:
    """One measurement in a fresh process (RSS watchdog); returns its JSON plus ``wall_s``."""
    n = len(list(work.glob("spec-*.json")))
    spec_file, out_file, err_file = work / f"spec-{n}.json", work / f"out-{n}.json", work / f"stderr-{n}.txt"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_VERBOSITY="error")
    t0, killed = time.perf_counter(), False
    with open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file),
                                 str(out_file)], stdout=err, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while proc.poll() is None:
            try:
                rss = int(Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
            except (OSError, IndexError):
                rss = 0.0
            if rss > limit_gb * 1024:
                proc.kill()  # the process started here
                killed = True
            time.sleep(0.25)
    wall = time.perf_counter() - t0
    if killed or proc.returncode != 0 or not out_file.exists():
        tail = err_file.read_text()[-1500:]
        log(f"  FAILED {spec['tool']} ({'killed: RSS limit' if killed else f'rc {proc.returncode}'}): {tail}")
        return {"error": "killed" if killed else f"exit code {proc.returncode}", "spec": spec, "stderr_tail": tail}
    result = json.loads(out_file.read_text())
    result.update(spec={k: v for k, v in spec.items() if not k.endswith("_file")}, wall_s=wall)
    log(f"  {spec['tool']}: {wall:.0f} s wall, {statistics.mean(_measured(result)):.2f} s/step, "
        f"peak {result['peak_rss_train_mb']:.0f} MB")
    return result


def _measured(run: dict) -> list[float]:
    return run["step_s"][run["spec"]["warmup"]:] or run["step_s"]


def summarise(runs: list[dict], batch: int) -> dict:
    """Per tool: median s/step over the measured steps of all rounds, pairs/s, tokens/s, peak RSS (max);
    preftune / TRL ratios (throughput: higher is better; RSS: lower)."""
    out: dict = {}
    for tool in TOOLS:
        ok = [r for r in runs if r.get("spec", {}).get("tool") == tool and "error" not in r]
        if not ok:
            continue
        steps = [s for r in ok for s in _measured(r)]
        warm = ok[0]["spec"]["warmup"]
        tokens = [t for r in ok for t in r["logical_tokens"][warm:] or r["logical_tokens"]]
        out[tool] = {"runs": len(ok), "s_per_step": statistics.median(steps), "pairs_per_s": batch / statistics.median(steps),
                     "logical_tokens_per_s": statistics.mean(tokens) / statistics.median(steps),
                     "peak_rss_mb": max(r["peak_rss_train_mb"] for r in ok),
                     "first_step_loss": ok[0]["losses"][0] if ok[0]["losses"] else None,
                     "token_check": ok[0]["token_check"]}
    if all(t in out for t in TOOLS):
        ours, trl = out["preftune-rm"], out["trl-rm"]
        out["throughput_ratio"] = ours["pairs_per_s"] / trl["pairs_per_s"]
        out["peak_rss_ratio"] = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        if ours["first_step_loss"] is not None and trl["first_step_loss"] is not None:
            out["first_step_loss_diff"] = abs(ours["first_step_loss"] - trl["first_step_loss"])
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Smoke run: 2 pairs of <= 128 tokens, 1 + 1 steps, one round.")
    p.add_argument("--batch", type=int, default=8, help="Pairs per step (both tools).")
    p.add_argument("--warmup", type=int, default=1, help="Warm-up steps (not measured).")
    p.add_argument("--steps", type=int, default=3, help="Measured steps.")
    p.add_argument("--rounds", type=int, default=2, help="Rounds (the tools alternate their order per round).")
    p.add_argument("--max-length", type=int, default=512, help="Max tokens of prompt + completion.")
    p.add_argument("--checkpointing", choices=("on", "off", "defaults"), default="on",
                   help="Activation checkpointing for both tools (TRL RewardConfig's default: on); defaults: each "
                        "tool's own default (TRL: on; preftune: layers checkpointed from its memory budget) and LoRA "
                        "dropout 0.05 (TRL ModelConfig's default) on both sides.")
    p.add_argument("--mem-limit-gb", type=float, default=10.0, help="Kill a run whose RSS passes this.")
    p.add_argument("--out", default=None, help="Results JSON (default benchmarks/results/bench_rm[_quick].json).")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.warmup, args.steps, args.rounds, args.max_length = 2, 1, 1, 1, 128
    return args


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        spec = json.loads(Path(sys.argv[2]).read_text())
        Path(sys.argv[3]).write_text(json.dumps(run_worker_spec(spec)))
        return 0
    import bench_data

    args = parse_args(argv)
    out = Path(args.out or HERE / "results" / ("bench_rm_quick.json" if args.quick else "bench_rm.json"))
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="ptbench-rm-"))
    n_pairs = args.batch * (args.warmup + args.steps)
    max_prompt_length = min(256, args.max_length // 2)
    data = bench_data.prepare("hh", n_pairs, work / "data", max_length=args.max_length,
                              max_prompt_length=max_prompt_length)
    log(f"work dir {work}; data: {json.dumps({k: v for k, v in data.items() if not k.endswith('_file')})}")
    base = dict(kind="train", batch=args.batch, warmup=args.warmup, steps=args.steps,
                checkpointing=None if args.checkpointing == "defaults" else args.checkpointing == "on",
                lora_dropout=0.05 if args.checkpointing == "defaults" else 0.0, max_length=args.max_length, max_prompt_length=max_prompt_length,
                preftune_file=data["preftune_file"], pairs_file=data["pairs_file"], dataset="hh")
    res = {"command": " ".join(["benchmarks/bench_rm.py"] + (argv if argv is not None else sys.argv[1:])),
           "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "settings": vars(args),
           "loadavg_start": os.getloadavg(), "mem_available_gb": _mem_available_gb(),
           "data": {k: v for k, v in data.items() if not k.endswith("_file")}, "runs": []}
    for r in range(args.rounds):
        for tool in (TOOLS if r % 2 == 0 else TOOLS[::-1]):
            log(f"round {r + 1}: {tool}")
            res["runs"].append({"round": r + 1, **run_one({**base, "tool": tool}, args.mem_limit_gb, work, log)})
    res["summary"] = summarise(res["runs"], args.batch)
    res["loadavg_end"] = os.getloadavg()
    res["total_s"] = time.perf_counter() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["summary"], indent=1))
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
