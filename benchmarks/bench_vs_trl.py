"""preftune vs TRL 1.16: throughput, peak memory, first-step loss, efficiency, vocabulary sweep.

    .venv/bin/python benchmarks/bench_vs_trl.py            # full benchmark → results JSON + docs/performance.md
    .venv/bin/python benchmarks/bench_vs_trl.py --quick    # small smoke run (results/quick.json only)
    .venv/bin/python benchmarks/bench_vs_trl.py --only-sweep --sweep 512,1024,2048,4096,8192   # length sweep

Same model (SmolLM2-135M-Instruct, fp32, SDPA, LoRA r=16 / alpha 32 on all linear layers), same
pairs with the same truncation (``bench_data``), same batch, same steps, sequential data order.
Two settings (``--settings``): *defaults* (each tool as users run it: TRL's gradient_checkpointing
default, preftune's memory-budget checkpointing, LoRA dropout 0.05 = TRL ModelConfig's default)
and *checkpointing* (activation checkpointing on both sides, LoRA dropout 0, as in earlier runs). Every measurement runs in its own process
(``bench_worker.py``); the configurations of one round run back to back and rounds repeat, so the
ratios compare runs taken minutes apart on a shared, noisy machine. A watchdog kills a run whose RSS
passes ``--mem-limit-gb``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_data  # noqa: E402
import bench_report  # noqa: E402

PAIRS = {"cpo": ("trl-cpo", "preftune-cpo"), "dpo": ("trl-dpo", "preftune-dpo"),
         "dpo-pre": ("trl-dpo-pre", "preftune-dpo")}


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def mem_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_worker(spec: dict, limit_gb: float, work: Path, log) -> dict:
    """Run one measurement in a fresh process; returns its JSON (plus ``wall_s``, ``watchdog_peak_mb``)."""
    waited = 0
    while mem_available_gb() < min(limit_gb + 1, 0.75 * mem_total_gb()) and waited < 120:
        time.sleep(10)
        waited += 10
    n = len(list(work.glob("spec-*.json")))
    spec_file, out_file = work / f"spec-{n}.json", work / f"out-{n}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               PREFTUNE_REF_CACHE=str(work / f"ref-cache-{n}"), TRANSFORMERS_VERBOSITY="error")
    err_file = work / f"stderr-{n}.txt"
    t0, peak, killed = time.perf_counter(), 0.0, False
    with open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, str(HERE / "bench_worker.py"), str(spec_file), str(out_file)],
                                stdout=err, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                rss = int(status.split("VmRSS:")[1].split()[0]) / 1024
            except (OSError, IndexError):
                rss = 0.0
            peak = max(peak, rss)
            if rss > limit_gb * 1024:
                proc.kill()  # only the process started here
                killed = True
            time.sleep(0.25)
    wall = time.perf_counter() - t0
    label = f"{spec.get('tool', spec['kind'])} {spec.get('dataset', '')} V={spec.get('vocab', '')}".strip()
    if killed or proc.returncode != 0 or not out_file.exists():
        tail = err_file.read_text()[-1500:]
        why = f"killed: RSS > {limit_gb:.0f} GB" if killed else f"rc {proc.returncode}"
        log(f"  FAILED {label} ({why}): {tail}")
        return {"error": "killed (memory limit)" if killed else f"exit code {proc.returncode}", "spec": spec,
                "wall_s": wall, "watchdog_peak_mb": peak, "stderr_tail": tail}
    result = json.loads(out_file.read_text())
    result.update(spec=spec, wall_s=wall, watchdog_peak_mb=peak, mem_available_gb_before=mem_available_gb())
    log(f"  {label}: {wall:.0f} s wall, peak {result.get('peak_rss_train_mb', 0):.0f} MB")
    return result


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:20]
    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout
    return {"nproc": os.cpu_count(), "lscpu_head": lscpu, "free_g": free, "loadavg": os.getloadavg(),
            "python": platform.python_version(), "versions": _versions()}


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "trl", "peft", "preftune")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Small smoke run: 2 pairs, 1+1 steps, WMT only, small sweep.")
    p.add_argument("--datasets", default="hh,wmt", help="Comma list of hh, wmt.")
    p.add_argument("--batch", type=int, default=8, help="Pairs per step (both tools).")
    p.add_argument("--warmup", type=int, default=1, help="Warm-up steps (not measured).")
    p.add_argument("--steps", type=int, default=3, help="Measured steps.")
    p.add_argument("--rounds", type=int, default=2, help="Rounds of A B (alternating) runs.")
    p.add_argument("--losses", default="cpo,dpo", help="cpo, dpo (dpo runs TRL with and without precompute).")
    p.add_argument("--settings", default="defaults,checkpointing",
                   help="Comma list: defaults (each tool's defaults, LoRA dropout 0.05), checkpointing (activation "
                   "checkpointing on both sides, LoRA dropout 0: the earlier runs' setting).")
    p.add_argument("--layouts", action=argparse.BooleanOptionalAction, default=True,
                   help="Also preftune CPO with --share_prompt / --padding_free off (defaults setting, round 1).")
    p.add_argument("--no-checkpointing-row", action="store_true", help="Obsolete (the defaults setting replaces it).")
    p.add_argument("--sweep", default="", help="max_length sweep, e.g. 512,1024,2048,4096,8192 (hh-long pairs: "
                   "prompt L/2, completions L/4 each; preftune and TRL CPO, each tool's defaults).")
    p.add_argument("--sweep-batch", type=int, default=2, help="Pairs per step in the sweep.")
    p.add_argument("--sweep-warmup", type=int, default=0, help="Warm-up steps in the sweep (not measured).")
    p.add_argument("--sweep-steps", type=int, default=1, help="Measured steps in the sweep.")
    p.add_argument("--sweep-mem-limit-gb", type=float, default=22.0, help="Watchdog limit of a sweep run.")
    p.add_argument("--only-sweep", action="store_true", help="Run the sweep only (no main rows, parity, vocab).")
    p.add_argument("--parity-pairs", type=int, default=8, help="Batch of the full fine-tuning parity step (0: skip).")
    p.add_argument("--vocab", default="32000,128000,256000", help="Vocabulary sweep sizes ('' to skip).")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="Profile one preftune CPO step (torch.profiler), an extra run not counted.")
    p.add_argument("--mem-limit-gb", type=float, default=10.0, help="Kill a run whose RSS passes this.")
    p.add_argument("--out", default=None, help="Results JSON (default benchmarks/results/bench_vs_trl[_quick].json).")
    p.add_argument("--no-docs", action="store_true", help="Do not rewrite docs/performance.md.")
    args = p.parse_args(argv)
    if args.quick:
        args.datasets, args.batch, args.warmup, args.steps, args.rounds = "wmt", 2, 1, 1, 1
        args.parity_pairs, args.vocab, args.no_docs = 2, "32000,64000", True
    if args.only_sweep:
        args.datasets, args.parity_pairs, args.vocab, args.profile, args.layouts = "", 0, "", False, False
    unknown = set(x for x in args.settings.split(",") if x) - set(SETTINGS)
    if unknown:
        p.error(f"--settings: unknown {sorted(unknown)}; choose from {sorted(SETTINGS)}")
    return args


# spec fields per setting: checkpointing None = the tool's default (TRL: on; preftune: from its memory budget)
SETTINGS = {"checkpointing": {"checkpointing": True, "lora_dropout": 0.0},
            "defaults": {"checkpointing": None, "lora_dropout": 0.05}}
LAYOUT_VARIANTS = ((False, True), (True, False), (False, False))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out or HERE / "results" / ("bench_vs_trl_quick.json" if args.quick else "bench_vs_trl.json"))
    started = datetime.datetime.now().astimezone()
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="ptbench-"))
    datasets = [d for d in args.datasets.split(",") if d]
    losses = [x for x in args.losses.split(",") if x]
    n_pairs = args.batch * (args.warmup + args.steps)
    res: dict = {"command": " ".join(["benchmarks/bench_vs_trl.py"] + (argv if argv is not None else sys.argv[1:])),
                 "started": started.isoformat(timespec="seconds"), "settings": vars(args), "machine": machine(),
                 "data": {}, "runs": [], "parity": [], "vocab": [], "matmul": [], "sweep": []}
    base = dict(kind="train", batch=args.batch, warmup=args.warmup, steps=args.steps, lora=True, checkpointing=True,
                max_length=512, max_prompt_length=256)
    log(f"work dir {work}; MemAvailable {mem_available_gb():.1f} GB; load {os.getloadavg()}")
    res["matmul"].append(run_worker({"kind": "matmul", "seconds": 4.0}, args.mem_limit_gb, work, log))
    for d in datasets:
        res["data"][d] = bench_data.prepare(d, max(n_pairs, args.parity_pairs), work / "data")
        log(f"data {d}: {json.dumps(res['data'][d])[:300]}")
    tools = []
    if "cpo" in losses:
        tools += ["trl-cpo", "preftune-cpo"]
    if "dpo" in losses:
        tools += ["trl-dpo", "preftune-dpo", "trl-dpo-pre"]
    settings = [x for x in args.settings.split(",") if x]
    for r in range(args.rounds):
        for d in datasets:
            files = {"dataset": d, "preftune_file": res["data"][d]["preftune_file"],
                     "pairs_file": res["data"][d]["pairs_file"]}
            for setting in settings:
                for tool in tools:
                    log(f"round {r + 1}: {tool} on {d} ({setting})")
                    res["runs"].append({"round": r + 1, "variant": setting, **run_worker(
                        {**base, **files, **SETTINGS[setting], "tool": tool}, args.mem_limit_gb, work, log)})
            if args.layouts and r == 0 and d == datasets[0] and "cpo" in losses:
                for sp, pf in LAYOUT_VARIANTS:
                    variant = f"defaults, --share_prompt {str(sp).lower()} --padding_free {str(pf).lower()}"
                    log(f"round {r + 1}: preftune-cpo on {d} ({variant})")
                    spec = {**base, **files, **SETTINGS["defaults"], "tool": "preftune-cpo",
                            "preftune_args": ["--share_prompt", str(sp).lower(), "--padding_free", str(pf).lower()]}
                    res["runs"].append({"round": r + 1, "variant": variant,
                                        **run_worker(spec, args.mem_limit_gb, work, log)})
            _save(res, out)
    if args.profile and datasets:
        d = datasets[0]
        files = {"dataset": d, "preftune_file": res["data"][d]["preftune_file"], "pairs_file": res["data"][d]["pairs_file"]}
        log(f"profile: preftune-cpo on {d}")
        res["profile"] = run_worker({**base, **files, **SETTINGS["defaults"], "tool": "preftune-cpo", "steps": 1,
                                     "profile_step": args.warmup},
                                    args.mem_limit_gb, work, log)
    if args.parity_pairs and datasets:
        d = datasets[0]
        files = {"dataset": d, "preftune_file": res["data"][d]["preftune_file"], "pairs_file": res["data"][d]["pairs_file"]}
        for loss in ("cpo", "dpo"):
            for tool in (f"trl-{loss}" if loss == "cpo" else "trl-dpo-pre", f"preftune-{loss}"):
                log(f"parity (full fine-tuning, 1 step of {args.parity_pairs} pairs): {tool}")
                res["parity"].append(run_worker({**base, **files, "tool": tool, "lora": False, "warmup": 0, "steps": 1,
                                                 "batch": args.parity_pairs}, args.mem_limit_gb, work, log))
        _save(res, out)
    for v in [int(x) for x in args.vocab.split(",") if x]:
        for tool in ("trl", "preftune", "preftune-chunk128"):
            log(f"vocab sweep V={v}: {tool}")
            spec = {"kind": "vocab", "tool": tool, "vocab": v, "batch": 8, "prompt_len": 32, "completion_len": 64}
            res["vocab"].append(run_worker(spec, args.mem_limit_gb, work, log))
        _save(res, out)
    for length in [int(x) for x in args.sweep.split(",") if x]:
        n = args.sweep_batch * (args.sweep_warmup + args.sweep_steps)
        data = bench_data.prepare("hh-long", n, work / f"data-{length}", max_length=length,
                                  max_prompt_length=length // 2)
        for tool in ("trl-cpo", "preftune-cpo"):
            log(f"sweep max_length {length}: {tool}")
            spec = {**base, **SETTINGS["defaults"], "tool": tool, "dataset": f"hh-long-{length}",
                    "preftune_file": data["preftune_file"], "pairs_file": data["pairs_file"],
                    "batch": args.sweep_batch, "warmup": args.sweep_warmup, "steps": args.sweep_steps,
                    "max_length": length, "max_prompt_length": length // 2}
            res["sweep"].append({"data": {k: v for k, v in data.items() if "file" not in k},
                                 **run_worker(spec, args.sweep_mem_limit_gb, work, log)})
        _save(res, out)
    res["matmul"].append(run_worker({"kind": "matmul", "seconds": 4.0}, args.mem_limit_gb, work, log))
    res["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    res["total_s"] = time.perf_counter() - t_start
    res["loadavg_end"] = os.getloadavg()
    res["summary"] = bench_report.summarise(res)
    _save(res, out)
    table = bench_report.markdown(res)
    print(table)
    if not args.no_docs:
        bench_report.write_docs(ROOT / "docs" / "performance.md", table)
        log("docs/performance.md updated")
    log(f"results: {out}")
    return 0


def _save(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(res))
    for run in slim["runs"] + slim["parity"] + slim["vocab"] + slim.get("sweep", []):
        run.get("spec", {}).pop("preftune_file", None)
        run.get("spec", {}).pop("pairs_file", None)
    out.write_text(json.dumps(slim, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
