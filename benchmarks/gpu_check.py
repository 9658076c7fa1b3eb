"""The GPU check (``scripts/gpu_check.sh``): one command that measures preftune on one NVIDIA GPU, or
rehearses every step on the CPU with tiny shapes (``--cpu-dry-run``, run by CI).

    scripts/gpu_check.sh [--cpu-dry-run] [RESULTS_DIR]      # RESULTS_DIR: default $OUT, else outputs/gpu_check

Steps, each in its own process(es) with its own time limit, each reported pass / fail / skipped with its
numbers in ``RESULTS_DIR/summary.json`` (and a table on stdout; logs in ``RESULTS_DIR/logs/``):

a. ``env``: torch, CUDA, the GPU (name, memory, bf16), NCCL, versions of transformers, peft, accelerate,
   trl, datasets, liger-kernel, pytest and preftune's other dependencies (absent packages are listed
   under ``missing``, never fatal);
b. ``cuda_tests``: ``pytest -m cuda`` over the test files that use the marker;
c. ``parity``: CPO / DPO / ORPO / reward-model loss, metrics and gradients vs TRL 1.16 on one batch
   (``benchmarks/gpu_parity.py``): on the GPU float32 on the tiny shape (tight tolerance) and bfloat16
   on Qwen2.5-0.5B's shape; on the CPU float32, tiny;
d. ``torchrun``: ``torchrun --nproc_per_node 1 -m preftune.cli train`` (DPO, 2 steps, a tiny random
   Llama saved from a config): NCCL and DDP with ``device_ids`` on the GPU, gloo on the CPU;
e. ``throughput``: tokens/s, peak memory and MFU of preftune vs TRL ``DPOTrainer`` / ``CPOTrainer`` (each
   tool's defaults; TRL also with ``use_liger_kernel=True`` when liger-kernel imports), on random-
   initialised models of real shapes (Llama-3.2-1B, Qwen2.5-0.5B) at 2048 and 8192 tokens, bf16
   (``benchmarks/gpu_throughput.py``, one process per run, in priority order until the budget ends).

The whole check keeps to ``--budget`` seconds (GPU: 530; dry run: 240, a cap: it takes 80-140 s): a step gets the smaller of its own
limit and what is left; throughput runs that no longer fit are reported skipped. Nothing is downloaded.
Exit code: 0 when no step failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "liger_kernel", "flash_attn",
            "pytest", "safetensors", "yaml", "numpy", "gguf", "sacrebleu", "matplotlib", "tokenizers")
# distribution names where they differ from the import name
DISTRIBUTIONS = {"liger_kernel": "liger-kernel", "flash_attn": "flash-attn", "yaml": "pyyaml"}
# what each step needs beyond torch / transformers / peft / accelerate (and preftune's own dependencies)
NEEDS = {"cuda_tests": ("pytest",), "parity": ("trl", "datasets"), "throughput TRL runs": ("trl", "datasets"),
         "throughput liger runs": ("liger_kernel",)}

TOOLS = [("preftune-dpo", False), ("trl-dpo", False), ("trl-dpo", True), ("preftune-cpo", False),
         ("trl-cpo", False), ("trl-cpo", True)]
DPO_TOOLS = TOOLS[:3]
# (shape, length, pairs per step, tools), in priority order: runs that no longer fit the budget are skipped
GPU_RUNS = [("llama-3.2-1b", 2048, 4, TOOLS), ("llama-3.2-1b", 8192, 1, TOOLS),
            ("qwen2.5-0.5b", 2048, 4, TOOLS), ("qwen2.5-0.5b", 8192, 1, TOOLS)]
# the dry run: the same runs on a tiny Llama at 128 and 256 tokens (CPO at 128 only: CI time)
DRY_RUNS = [("tiny", 128, 2, TOOLS), ("tiny", 256, 2, DPO_TOOLS)]

LIMITS = {"env": 60, "cuda_tests": 150, "parity": 180, "torchrun": 120, "throughput_run": 150}
DRY_LIMITS = {"env": 45, "cuda_tests": 60, "parity": 90, "torchrun": 75, "throughput_run": 30}


# ---- processes ---------------------------------------------------------------------------------
def _env() -> dict:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=src + (os.pathsep + path if path else ""), TOKENIZERS_PARALLELISM="false",
                TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                PYTHONWARNINGS="ignore")


def run_cmd(argv: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run ``argv`` in its own process group; on timeout that group (started here) is killed."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env or _env(),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, timed_out = None, True
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.perf_counter() - t0, 2), "log": str(log)}


def tail(path: str | Path, n: int = 1500) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ---- a. environment ----------------------------------------------------------------------------
def probe_env(out: str) -> None:
    """Run in a child process: what this machine has (written as JSON to ``out``)."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict = {"python": sys.version.split()[0], "packages": {}, "missing": []}
    for name in PACKAGES:
        if importlib.util.find_spec(name) is None:
            info["missing"].append(DISTRIBUTIONS.get(name, name))
            continue
        try:
            info["packages"][name] = version(DISTRIBUTIONS.get(name, name))
        except PackageNotFoundError:
            info["packages"][name] = "importable (no metadata)"
    try:
        import preftune.cli  # noqa: F401
        import preftune.trl  # noqa: F401

        info["preftune_import"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, the check goes on
        info["preftune_import"] = f"{type(exc).__name__}: {exc}"
    import torch

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["cpu_count"] = os.cpu_count()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        info.update(device_count=torch.cuda.device_count(), gpu=props.name, gpu_memory_gb=round(total / 2**30, 1),
                    gpu_free_gb=round(free / 2**30, 1), capability=f"{props.major}.{props.minor}",
                    bf16=torch.cuda.is_bf16_supported(), nccl=torch.distributed.is_nccl_available())
        try:
            v = torch.cuda.nccl.version()
            info["nccl_version"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as exc:  # noqa: BLE001 - reported
            info["nccl_version"] = f"unknown ({type(exc).__name__})"
        import gpu_shapes

        info["peak_bf16_tflops"] = (gpu_shapes.peak_flops(props.name) or 0) / 1e12 or None
    Path(out).write_text(json.dumps(info))


def step_env(ctx) -> dict:
    res = run_cmd([sys.executable, str(Path(__file__)), "--probe-env", str(ctx.work / "env.json")], ctx.log("env"),
                  ctx.limit("env"))
    if res["rc"] != 0:
        return {"status": "fail", "reason": "timed out" if res["timed_out"] else f"exit code {res['rc']}",
                "seconds": res["seconds"], "log_tail": tail(res["log"])}
    info = json.loads((ctx.work / "env.json").read_text())
    ctx.env = info
    if info["preftune_import"] != "ok":
        return {"status": "fail", "reason": f"preftune does not import: {info['preftune_import']}", "numbers": info,
                "seconds": res["seconds"]}
    if not ctx.dry and not info["cuda_available"]:
        return {"status": "fail", "reason": "no CUDA device (run with --cpu-dry-run on a CPU machine)",
                "numbers": info, "seconds": res["seconds"]}
    return {"status": "pass", "numbers": info, "seconds": res["seconds"]}


# ---- b. cuda-marked tests ----------------------------------------------------------------------
def step_cuda_tests(ctx) -> dict:
    if not ctx.has("pytest"):
        return {"status": "skipped", "reason": "pytest is not installed"}
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text(errors="replace"))
    if not files:
        return {"status": "fail", "reason": "no test file uses the cuda marker"}
    xml = ctx.work / "cuda_tests.xml"
    res = run_cmd([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                   f"--junitxml={xml}", *files], ctx.log("cuda_tests"), ctx.limit("cuda_tests"))
    numbers = {"files": files, "seconds": res["seconds"]}
    if res["timed_out"]:
        return {"status": "fail", "reason": "timed out", "numbers": numbers, "log_tail": tail(res["log"])}
    if not xml.exists():
        return {"status": "fail", "reason": f"pytest exit code {res['rc']}, no report", "numbers": numbers,
                "log_tail": tail(res["log"])}
    import xml.etree.ElementTree as ET

    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
    numbers.update(counts, skip_reasons=reasons)
    if counts["tests"] == 0:
        return {"status": "fail", "reason": "no cuda-marked test collected", "numbers": numbers}
    if counts["failures"] or counts["errors"] or res["rc"] not in (0, 5):
        return {"status": "fail", "reason": f"{counts['failures']} failed, {counts['errors']} errors",
                "numbers": numbers, "log_tail": tail(res["log"])}
    if counts["passed"] == 0:
        return {"status": "skipped", "reason": f"all {counts['skipped']} cuda tests skipped: " + "; ".join(reasons)[:300],
                "numbers": numbers}
    return {"status": "pass", "numbers": numbers}


# ---- c. parity vs TRL --------------------------------------------------------------------------
def step_parity(ctx) -> dict:
    missing = [p for p in NEEDS["parity"] if not ctx.has(p)]
    if missing:
        return {"status": "skipped", "reason": f"not installed: {', '.join(missing)}"}
    runs = [("cpu", "float32", "tiny")] if ctx.dry else [("cuda", "float32", "tiny"), ("cuda", "bfloat16", "qwen2.5-0.5b")]
    numbers, failures = {}, []
    t_end = time.monotonic() + ctx.limit("parity")
    for device, dtype, shape in runs:
        key = f"{dtype} {shape}"
        out = ctx.work / f"parity-{dtype}-{shape}.json"
        res = run_cmd([sys.executable, str(HERE / "gpu_parity.py"), "--device", device, "--dtype", dtype, "--shape",
                       shape, "--out", str(out)], ctx.log(f"parity-{dtype}-{shape}"), t_end - time.monotonic())
        if not out.exists():
            numbers[key] = {"error": "timed out" if res["timed_out"] else f"exit code {res['rc']}"}
            failures.append(f"{key}: {numbers[key]['error']}: {tail(res['log'], 600)}")
            continue
        data = json.loads(out.read_text())
        numbers[key] = {"device": device, "seconds": res["seconds"], "tolerance": data["tolerance"], "cases": {
            c["case"]: {k: c.get(k) for k in ("passed", "trl_loss", "max_loss_diff", "max_metric_diff",
                                              "max_grad_rel_diff", "error")} for c in data["cases"]}}
        for c in data["cases"]:
            if not c["passed"]:
                failures.append(f"{key} {c['case']}: " + (c.get("error") or "; ".join(c.get("failures", [])[:2])))
    if failures:
        return {"status": "fail", "reason": " | ".join(failures)[:1500], "numbers": numbers}
    return {"status": "pass", "numbers": numbers}


# ---- d. torchrun, one process ------------------------------------------------------------------
def step_torchrun(ctx) -> dict:
    import gpu_shapes

    t0 = time.perf_counter()
    model_dir = ctx.work / "tiny-model"
    if not (model_dir / "config.json").exists():
        gpu_shapes.save_model_dir("tiny", model_dir)
    data = ctx.work / "ddp-pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in gpu_shapes.synthetic_records(8, 128, seed=3)))
    run_dir = ctx.work / "ddp-run"
    cuda = not ctx.dry
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            "-m", "preftune.cli", "train", "--model_name_or_path", str(model_dir), "--dataset", str(data),
            "--loss", "dpo", "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "256",
            "--output_dir", str(run_dir), "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
            "--ddp_backend", "nccl" if cuda else "gloo"]
    if cuda:
        argv += ["--bf16", "true"]
    res = run_cmd(argv, ctx.log("torchrun"), ctx.limit("torchrun") - (time.perf_counter() - t0))
    numbers = {"command": "torchrun " + " ".join(argv[3:]), "backend": "nccl" if cuda else "gloo",
               "seconds": res["seconds"], "rc": res["rc"]}
    if res["rc"] != 0:
        return {"status": "fail", "reason": "timed out" if res["timed_out"] else f"exit code {res['rc']}",
                "numbers": numbers, "log_tail": tail(res["log"])}
    losses = _logged_losses(run_dir, Path(res["log"]))
    numbers["losses"] = losses
    if len(losses) < 2 or not all(math.isfinite(x) for x in losses):
        return {"status": "fail", "reason": f"expected 2 finite step losses, found {losses}", "numbers": numbers,
                "log_tail": tail(res["log"])}
    return {"status": "pass", "numbers": numbers}


def _logged_losses(run_dir: Path, log: Path) -> list[float]:
    """Step losses from the run's ``trainer_state.json`` (any depth), else from the logged dicts."""
    for state in sorted(run_dir.rglob("trainer_state.json")):
        hist = json.loads(state.read_text()).get("log_history", [])
        losses = [float(h["loss"]) for h in hist if "loss" in h]
        if losses:
            return losses
    import ast

    losses = []
    for line in log.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{") and "'loss'" in line:
            try:
                losses.append(float(ast.literal_eval(line)["loss"]))
            except (ValueError, SyntaxError, KeyError):
                pass
    return losses


# ---- e. throughput -----------------------------------------------------------------------------
def step_throughput(ctx) -> dict:
    """GPU: one process per run (its own peak memory; an OOM or hang loses one run), in priority order while
    the budget lasts. Dry run: every run in one process (CI time: one start-up instead of one per run)."""
    runs, failures, skipped, todo = [], [], [], []
    has_trl = all(ctx.has(p) for p in NEEDS["throughput TRL runs"])
    has_liger = ctx.has("liger_kernel")
    for shape, length, batch, tools in DRY_RUNS if ctx.dry else GPU_RUNS:
        for tool, liger in tools:
            label = f"{tool}{'+liger' if liger else ''} {shape} L={length}"
            if tool.startswith("trl") and not has_trl:
                skipped.append({"run": label, "reason": "trl / datasets not installed"})
            elif liger and not has_liger:
                skipped.append({"run": label, "reason": "liger-kernel not installed"})
            else:
                todo.append((label, {"tool": tool, "liger": liger, "shape": shape, "length": length, "batch": batch,
                                     "warmup": 1, "steps": 1 if ctx.dry else 2, "device": "cpu" if ctx.dry else "cuda",
                                     "dtype": "float32" if ctx.dry else "bfloat16", "bf16": False if ctx.dry else None}))
    groups = [todo] if ctx.dry else [[t] for t in todo]
    for n, group in enumerate(groups):
        left = ctx.left()
        if left < 45:
            skipped += [{"run": label, "reason": f"check budget spent ({left:.0f} s left)"} for label, _ in group]
            continue
        spec_file, out_file = ctx.work / f"tput-spec-{n}.json", ctx.work / f"tput-out-{n}.json"
        spec_file.write_text(json.dumps([s for _, s in group] if ctx.dry else group[0][1]))
        env = dict(_env(), PREFTUNE_REF_CACHE=str(ctx.work / f"ref-cache-{n}"))
        res = run_cmd([sys.executable, str(HERE / "gpu_throughput.py"), str(spec_file), str(out_file)],
                      ctx.log(f"throughput-{n}"), min(ctx.limits["throughput_run"] * len(group), left - 5), env)
        results = json.loads(out_file.read_text()) if out_file.exists() else []
        results = results if isinstance(results, list) else [results]
        for i, (label, _) in enumerate(group):
            r = results[i] if i < len(results) else {"error": "timed out" if res["timed_out"] else f"exit code {res['rc']}"}
            if "error" in r:
                failures.append({"run": label, "error": r["error"], "log_tail": r.get("traceback") or tail(res["log"], 800)})
                continue
            r["wall_s"] = res["seconds"]
            runs.append(r)
            if not (r["finite_losses"] and r["tokens_per_s"] > 0):
                failures.append({"run": label, "error": f"losses {r['losses']}, tokens/s {r['tokens_per_s']}"})
    numbers = {"runs": [{k: r[k] for k in ("tool", "shape", "length", "batch", "tokens_per_s", "peak_memory_mb",
                                           "peak_memory_kind", "mfu", "setup_s", "step_s", "losses", "wall_s",
                                           "checkpointed_layers")} for r in runs],
               "comparisons": _comparisons(runs), "failed_runs": failures, "skipped_runs": skipped}
    if failures:
        return {"status": "fail", "reason": "; ".join(f"{f['run']}: {f['error']}" for f in failures)[:1500],
                "numbers": numbers}
    if not runs:
        return {"status": "skipped", "reason": "no run fitted", "numbers": numbers}
    return {"status": "pass", "numbers": numbers}


def _comparisons(runs: list[dict]) -> list[dict]:
    """preftune vs each TRL variant on the same shape, length and loss: speed and memory ratios."""
    by = {(r["tool"], r["shape"], r["length"]): r for r in runs}
    out = []
    for (tool, shape, length), r in by.items():
        if not tool.startswith("preftune"):
            continue
        loss = tool.split("-", 1)[1]
        for other in (f"trl-{loss}", f"trl-{loss}+liger"):
            t = by.get((other, shape, length))
            if t is None or not t["tokens_per_s"] or not t["peak_memory_mb"]:
                continue
            out.append({"shape": shape, "length": length, "preftune": tool, "trl": other,
                        "speed_ratio": r["tokens_per_s"] / t["tokens_per_s"],
                        "memory_ratio": r["peak_memory_mb"] / t["peak_memory_mb"],
                        # issue 21's target (GPU, vs TRL with liger): >= 1.5x tokens/s at <= 0.6x peak memory
                        "target_met": (r["tokens_per_s"] >= 1.5 * t["tokens_per_s"]
                                       and r["peak_memory_mb"] <= 0.6 * t["peak_memory_mb"]) if "liger" in other else None})
    return out


# ---- driver ------------------------------------------------------------------------------------
class Context:
    def __init__(self, out: Path, dry: bool, budget: float):
        self.out, self.dry = out, dry
        self.work, self.logs = out / "work", out / "logs"
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget
        self.limits = DRY_LIMITS if dry else LIMITS
        self.env: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, step: str) -> float:
        return max(1.0, min(self.limits[step], self.left()))

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.txt"

    def has(self, package: str) -> bool:
        if self.env:
            return DISTRIBUTIONS.get(package, package) not in self.env.get("missing", [])
        return importlib.util.find_spec(package) is not None


STEPS = {"env": step_env, "cuda_tests": step_cuda_tests, "parity": step_parity, "torchrun": step_torchrun,
         "throughput": step_throughput}
# steps that only mean something on a GPU are skipped in the dry run
CUDA_ONLY_IN_DRY_RUN: dict[str, str] = {}


def table(summary: dict) -> str:
    lines = [f"GPU check ({summary['mode']}) — {summary.get('device', '?')} — {summary['total_s']:.0f} s", "",
             f"{'step':<12}{'status':<9}{'seconds':>8}  numbers / reason"]
    for name, s in summary["steps"].items():
        lines.append(f"{name:<12}{s['status']:<9}{s.get('seconds', 0):>8.1f}  {_brief(name, s)}")
    tput = summary["steps"].get("throughput", {}).get("numbers", {})
    if tput.get("runs"):
        lines += ["", f"{'run':<34}{'tokens/s':>11}{'peak MB':>10}{'MFU':>7}{'setup s':>9}"]
        for r in tput["runs"]:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            lines.append(f"{r['tool'] + ' ' + r['shape'] + ' L=' + str(r['length']):<34}{r['tokens_per_s']:>11.0f}"
                         f"{r['peak_memory_mb']:>10.0f}{mfu:>7}{r['setup_s']:>9.1f}")
        for c in tput.get("comparisons", []):
            lines.append(f"  {c['preftune']} / {c['trl']} {c['shape']} L={c['length']}: {c['speed_ratio']:.2f}x tokens/s, "
                         f"{c['memory_ratio']:.2f}x peak memory")
        for s in tput.get("skipped_runs", []):
            lines.append(f"  skipped: {s['run']} ({s['reason']})")
    if summary.get("missing"):
        lines += ["", "missing packages: " + ", ".join(summary["missing"])]
    return "\n".join(lines)


def _brief(name: str, s: dict) -> str:
    n = s.get("numbers", {})
    if s["status"] != "pass":
        return s.get("reason", "")[:200]
    if name == "env":
        return (f"torch {n.get('torch')} CUDA {n.get('torch_cuda')} {n.get('gpu', 'no GPU')} "
                f"{n.get('gpu_memory_gb', '')} transformers {n['packages'].get('transformers')} trl "
                f"{n['packages'].get('trl', 'absent')}")
    if name == "cuda_tests":
        return f"{n.get('passed')} passed, {n.get('skipped')} skipped"
    if name == "parity":
        parts = []
        for key, v in n.items():
            worst = max((c.get("max_loss_diff") or 0) for c in v["cases"].values())
            grad = max((c.get("max_grad_rel_diff") or 0) for c in v["cases"].values())
            parts.append(f"{key}: {len(v['cases'])} cases, max loss diff {worst:.1e}, grad rel {grad:.1e}")
        return "; ".join(parts)
    if name == "torchrun":
        return f"{n['backend']}, losses {[round(x, 4) for x in n['losses']]}"
    if name == "throughput":
        return f"{len(n['runs'])} runs, {len(n['skipped_runs'])} skipped"
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=None, help="Results directory (default: $OUT, else outputs/gpu_check).")
    p.add_argument("--cpu-dry-run", action="store_true", help="Every step on the CPU with tiny shapes.")
    p.add_argument("--budget", type=float, default=None, help="Seconds for the whole check (GPU 530, dry run 240: a cap for a loaded CI machine).")
    p.add_argument("--steps", default=",".join(STEPS), help=f"Comma list of {', '.join(STEPS)}.")
    p.add_argument("--probe-env", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_env:
        probe_env(args.probe_env)
        return 0
    out = Path(args.out or os.environ.get("OUT") or ROOT / "outputs" / "gpu_check").resolve()
    dry = args.cpu_dry_run
    ctx = Context(out, dry, args.budget or (240.0 if dry else 530.0))
    t0 = time.perf_counter()
    summary = {"mode": "cpu-dry-run" if dry else "gpu", "command": "scripts/gpu_check.sh " + " ".join(argv or sys.argv[1:]),
               "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "steps": {}}
    wanted = [s for s in args.steps.split(",") if s]
    if "env" not in wanted:
        wanted.insert(0, "env")  # every other step reads what the environment has
    for name in STEPS:
        if name not in wanted:
            continue
        s0 = time.perf_counter()
        print(f"[{s0 - t0:5.0f}s] {name} ...", flush=True)
        if name != "env" and summary["steps"]["env"]["status"] == "fail":
            result = {"status": "skipped", "reason": "the environment step failed"}
        elif ctx.left() < 5:
            result = {"status": "skipped", "reason": "check budget spent"}
        else:
            try:
                result = STEPS[name](ctx)
            except Exception as exc:  # noqa: BLE001 - one step's crash is that step's failure
                import traceback

                result = {"status": "fail", "reason": f"{type(exc).__name__}: {exc}",
                          "log_tail": traceback.format_exc()[-1500:]}
        result.setdefault("seconds", round(time.perf_counter() - s0, 2))
        result["seconds"] = round(time.perf_counter() - s0, 2)
        summary["steps"][name] = result
        print(f"[{time.perf_counter() - t0:5.0f}s] {name}: {result['status']} {_brief(name, result)}", flush=True)
        _write(summary, ctx, t0)
    summary = _write(summary, ctx, t0)
    print()
    print(table(summary))
    print(f"\nsummary: {out / 'summary.json'}")
    return 1 if any(s["status"] == "fail" for s in summary["steps"].values()) else 0


def _write(summary: dict, ctx: Context, t0: float) -> dict:
    env = ctx.env
    summary["device"] = env.get("gpu") or ("cpu" if env else None)
    summary["missing"] = env.get("missing", [])
    summary["needs"] = {k: [DISTRIBUTIONS.get(p, p) for p in v] for k, v in NEEDS.items()}
    summary["total_s"] = round(time.perf_counter() - t0, 2)
    summary["passed"] = not any(s["status"] == "fail" for s in summary["steps"].values())
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(main())
