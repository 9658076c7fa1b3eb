"""A/B of preftune's engine switches on the README main job's shape (run on a quiet machine).

    .venv/bin/python benchmarks/bench_speed.py                      # all variants, 2 rounds
    .venv/bin/python benchmarks/bench_speed.py --variants base,fused_lora --rounds 3

preftune CPO, SmolLM2-135M-Instruct, LoRA r16 all-linear, ``--lora_dropout 0.05``, HH-RLHF
harmless-base, batch ``--batch`` (8), max_length 512 / max_prompt_length 256, ``--warmup`` (1) +
``--steps`` (3) steps, every measurement in its own process (``bench_worker.py``), the variants
alternating within each round. Prints and writes (``--out``) per variant: median step wall time,
CPU seconds per step ÷ threads, peak RSS while training, checkpointed layers of the last step,
and the speed-up of each variant over ``base`` (per-round ratios, then their median).

Variants (``--variants``, comma list; every other flag at preftune's defaults):

* ``base``: the defaults;
* ``fused_lora`` / ``fused_lm_head`` / ``compile_layers``: that experimental switch on
  (compile: ``--warmup`` raised to 2, the first steps compile);
* ``no_budget``: ``--max_activation_memory_gb inf`` (never checkpoint; more memory);
* ``no_trim``: ``--malloc_trim false``; ``trim128`` / ``trim256`` / ``trim512`` / ``trim768`` / ``trim1024``:
  ``--malloc_trim_threshold_mb`` 128 / 256 / 512 / 768 / 1024 (trim only when that much freed memory is resident); ``mask``: ``--packed_attention mask``;
* ``all_fast``: fused_lora + fused_lm_head.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_data  # noqa: E402
from bench_vs_trl import SETTINGS, run_worker  # noqa: E402

VARIANTS = {
    "base": [],
    "fused_lora": ["--fused_lora", "true"],
    "fused_lm_head": ["--fused_lm_head", "true"],
    "compile_layers": ["--compile_layers", "true"],
    "all_fast": ["--fused_lora", "true", "--fused_lm_head", "true"],
    "no_budget": ["--max_activation_memory_gb", "inf"],
    "no_trim": ["--malloc_trim", "false"],
    "trim128": ["--malloc_trim_threshold_mb", "128"],
    "trim256": ["--malloc_trim_threshold_mb", "256"],
    "trim512": ["--malloc_trim_threshold_mb", "512"],
    "trim768": ["--malloc_trim_threshold_mb", "768"],
    "trim1024": ["--malloc_trim_threshold_mb", "1024"],
    "mask": ["--packed_attention", "mask"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--mem-limit-gb", type=float, default=12.0)
    p.add_argument("--out", default=str(HERE / "results" / "bench_speed.json"))
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="ptspeed-"))
    warmup_max = max(args.warmup, 2 if "compile_layers" in names else 0)
    data = bench_data.prepare("hh", args.batch * (warmup_max + args.steps), work / "data",
                              max_length=args.max_length, max_prompt_length=args.max_length // 2)
    runs = []
    for r in range(args.rounds):
        for name in names:
            warmup = max(args.warmup, 2) if name == "compile_layers" else args.warmup
            spec = {"kind": "train", "tool": "preftune-cpo", "dataset": "hh", "lora": True,
                    **SETTINGS["defaults"], "batch": args.batch, "warmup": warmup, "steps": args.steps,
                    "max_length": args.max_length, "max_prompt_length": args.max_length // 2,
                    "preftune_file": data["preftune_file"], "pairs_file": data["pairs_file"],
                    "preftune_args": VARIANTS[name]}
            log(f"round {r + 1}: {name}")
            res = run_worker(spec, args.mem_limit_gb, work, log)
            res.get("spec", {}).pop("preftune_file", None)
            res.get("spec", {}).pop("pairs_file", None)
            runs.append({"round": r + 1, "variant": name, **res})
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=1) + "\n")
    table = summarise(runs)
    print(markdown(table))
    Path(args.out).write_text(json.dumps({"settings": vars(args), "runs": runs, "summary": table}, indent=1) + "\n")
    return 0


def _figures(run: dict) -> dict | None:
    if "error" in run:
        return None
    w = run["spec"]["warmup"]
    steps, cpu = run["step_s"][w:], run["cpu_s"][w:]
    return {"step_s": statistics.median(steps), "cpu_s": statistics.median(cpu) / max(1, run.get("threads", 1)),
            "peak_mb": run["peak_rss_train_mb"], "loss0": run["losses"][0],
            "checkpointed": run.get("checkpointed_layers")}


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    by_round: dict = {}
    for run in runs:
        f = _figures(run)
        out.setdefault(run["variant"], {"rounds": [], "errors": []})
        if f is None:
            out[run["variant"]]["errors"].append(run["error"])
        else:
            out[run["variant"]]["rounds"].append(f)
            by_round.setdefault(run["round"], {})[run["variant"]] = f
    for name, v in out.items():
        rows = v["rounds"]
        for k in ("step_s", "cpu_s", "peak_mb"):
            v[k] = statistics.median([x[k] for x in rows]) if rows else None
        v["checkpointed"] = rows[-1]["checkpointed"] if rows else None
        ratios = [b["base"]["step_s"] / b[name]["step_s"] for b in by_round.values() if "base" in b and name in b]
        cpu = [b["base"]["cpu_s"] / b[name]["cpu_s"] for b in by_round.values() if "base" in b and name in b]
        v["speedup"] = statistics.median(ratios) if ratios else None
        v["cpu_speedup"] = statistics.median(cpu) if cpu else None
        v["per_round_speedup"] = ratios
    return out


def markdown(table: dict) -> str:
    lines = ["| variant | step s (wall) | CPU s / step ÷ threads | speed-up vs base (CPU) | per round | peak RSS MB | "
             "checkpointed layers |", "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for name, v in table.items():
        if v["step_s"] is None:
            lines.append(f"| {name} | failed: {'; '.join(v['errors'])} | | | | | |")
            continue
        sp = f"{v['speedup']:.2f}× ({v['cpu_speedup']:.2f}×)" if v["speedup"] else "–"
        ck = "/".join(map(str, v["checkpointed"])) if v["checkpointed"] else "–"
        lines.append(f"| {name} | {v['step_s']:.2f} | {v['cpu_s']:.2f} | {sp} | "
                     f"{', '.join(f'{x:.2f}' for x in v['per_round_speedup'])} | {v['peak_mb']:.0f} | {ck} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
