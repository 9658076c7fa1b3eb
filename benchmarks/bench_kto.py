"""KTO: preftune vs TRL 1.16's KTOTrainer, defaults against defaults, on HH-RLHF pairs made unpaired.

    .venv/bin/python benchmarks/bench_kto.py                       # 512 and 2048 tokens, 2 rounds
    .venv/bin/python benchmarks/bench_kto.py --lengths 512 --rounds 1 --steps 2   # a quick look

Both tools get the same paired records (``bench_data`` ``hh-long``: prompt max_length/2 tokens, chosen and
rejected max_length/4 each, cut from HH-RLHF ``harmless-base-dev``) and unpair them themselves (TRL's
``unpair_preference_dataset`` order, which preftune follows): ``2 × pairs`` examples, each scored with its KL
partner (the neighbour's completion after its prompt). The data holds exactly the examples trained on, so
preftune's reference pass (precomputed, its default) costs what it would in a run and is counted in
``total_s``. Model: SmolLM2-135M-Instruct (fp32, SDPA), LoRA r 16 / alpha 32 / dropout 0.05 (TRL
ModelConfig's default) on all linear layers; ``bf16`` set False for both (TRL's config would turn on bf16
autocast on a CPU); every other setting is each tool's default (TRL: gradient checkpointing on, reference
live in each step; preftune: memory-budget checkpointing, reference precomputed). Denormal floats are
flushed for both (``bench_worker``: without it either tool is several times slower on x86).

Each run is its own process; rounds alternate the tools. Prints and writes a JSON of: examples/s over the
measured steps (after ``--warmup``), total wall time (set-up + reference pass + all steps), peak RSS during
set-up and training (``VmHWM``), and the first step's loss (the same batch: the two should agree).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _worker(spec: dict) -> dict:
    import bench_worker as W
    import torch

    torch.set_flush_denormal(True)
    os.environ.setdefault("PREFTUNE_REF_CACHE", tempfile.mkdtemp(prefix="ptbench-ref-"))
    W.reset_peak_rss()
    t0 = time.perf_counter()
    steps = spec["warmup"] + spec["steps"]
    with tempfile.TemporaryDirectory(prefix="ptbench-kto-") as out:
        if spec["tool"] == "preftune":
            from preftune.cli_args import parse_groups
            from preftune.train import setup

            argv = ["--dataset", spec["file"], "--loss", "kto", "--max_length", str(spec["max_length"]),
                    "--max_prompt_length", str(spec["max_length"] - 1),  # TRL's KTO has no prompt limit
                    "--output_dir", out, "--per_device_train_batch_size", str(spec["batch"]),
                    "--max_steps", str(steps), "--learning_rate", "5e-6", "--logging_steps", "1000",
                    "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
                    "--use_peft", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05"]
            trainer = setup(parse_groups(argv)).trainer
        else:
            from datasets import Dataset
            from peft import LoraConfig
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from trl import KTOConfig, KTOTrainer

            from preftune.config import ModelArguments
            from preftune.models import resolve_model_source

            source = resolve_model_source(ModelArguments())
            tok = AutoTokenizer.from_pretrained(source)
            tok.bos_token = None  # SmolLM2's bos is a chat marker the tokenizer never adds (see bench_worker)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa")
            records = [json.loads(line) for line in Path(spec["file"]).read_text().splitlines()]
            args = KTOConfig(output_dir=out, per_device_train_batch_size=spec["batch"], max_steps=steps,
                             max_length=spec["max_length"], learning_rate=5e-6, logging_steps=1000, save_strategy="no",
                             report_to="none", seed=0, bf16=False, disable_tqdm=True)
            peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
            trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records),
                                 processing_class=tok, peft_config=peft)
        setup_s = time.perf_counter() - t0
        setup_peak = W.peak_rss_mb()
        rec = W.StepRecorder(trainer, spec["warmup"])
        W.reset_peak_rss()
        trainer.train()
        train_peak = W.peak_rss_mb()
    measured = rec.times[spec["warmup"]:]
    return {"setup_s": setup_s, "step_s": rec.times, "losses": rec.losses, "total_s": time.perf_counter() - t0,
            "examples_per_s": spec["batch"] * len(measured) / sum(measured), "peak_rss_setup_mb": setup_peak,
            "peak_rss_train_mb": train_peak, "peak_rss_mb": max(setup_peak, train_peak)}


def _prepare(max_length: int, examples: int, out_dir: Path) -> str:
    import bench_data

    info = bench_data.prepare("hh-long", examples // 2, out_dir / str(max_length), max_length=max_length,
                              max_prompt_length=max_length // 2)
    pairs = json.loads(Path(info["pairs_file"]).read_text())
    path = out_dir / f"kto-{max_length}.jsonl"
    path.write_text("".join(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for p in pairs))
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="512,2048", help="max_length values.")
    p.add_argument("--batch", default="8,4", help="Examples per step, one per length (or one for all).")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "bench_kto.json"))
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(_worker(spec)))
        return 0
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batch.split(",")]
    batches = batches * len(lengths) if len(batches) == 1 else batches
    work = Path(tempfile.mkdtemp(prefix="ptbench-kto-data-"))
    results: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"), "runs": []}
    for max_length, batch in zip(lengths, batches):
        examples = batch * (args.warmup + args.steps)
        file = _prepare(max_length, examples, work)
        for rnd in range(args.rounds):
            for tool in (("trl", "preftune") if rnd % 2 == 0 else ("preftune", "trl")):
                spec = {"tool": tool, "file": file, "max_length": max_length, "batch": batch,
                        "warmup": args.warmup, "steps": args.steps}
                spec_file, out_file = work / "spec.json", work / "out.json"
                spec_file.write_text(json.dumps(spec))
                subprocess.run([sys.executable, __file__, "--worker", str(spec_file), str(out_file)], check=True)
                row = {**spec, **json.loads(out_file.read_text()), "round": rnd}
                results["runs"].append(row)
                print(f"{tool:9s} L={max_length:5d} b={batch}: {row['examples_per_s']:.3f} ex/s, total "
                      f"{row['total_s']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB, first loss {row['losses'][0]:.6f}",
                      flush=True)
    summary = []
    for max_length in lengths:
        rows = {t: [r for r in results["runs"] if r["tool"] == t and r["max_length"] == max_length]
                for t in ("trl", "preftune")}
        best = {t: max(r["examples_per_s"] for r in rs) for t, rs in rows.items()}
        total = {t: min(r["total_s"] for r in rs) for t, rs in rows.items()}
        peak = {t: max(r["peak_rss_mb"] for r in rs) for t, rs in rows.items()}
        summary.append({"max_length": max_length, "throughput_ratio": best["preftune"] / best["trl"],
                        "total_time_ratio": total["trl"] / total["preftune"],
                        "peak_rss_ratio": peak["preftune"] / peak["trl"], "examples_per_s": best,
                        "total_s": total, "peak_rss_mb": peak,
                        "first_loss": {t: rs[0]["losses"][0] for t, rs in rows.items()}})
        s = summary[-1]
        print(f"L={max_length}: throughput x{s['throughput_ratio']:.2f}, total time x{s['total_time_ratio']:.2f}, "
              f"peak RSS x{s['peak_rss_ratio']:.2f} (preftune / TRL)")
    results["summary"] = summary
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
