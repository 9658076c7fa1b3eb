"""``scripts/gpu_check.sh --cpu-dry-run``: the GPU check's every step rehearsed on the CPU (tiny shapes).

The script runs once per module (80-140 s on 2 shared cores) into a temporary directory; the tests
read its ``summary.json``: every step present, the CPU-runnable ones passed with sane numbers, the
CUDA-only ones skipped with a reason.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "cuda_tests", "parity", "torchrun", "throughput"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-dry-run", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=420)
    summary_file = out / "summary.json"
    assert summary_file.exists(), f"no summary (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(summary_file.read_text()), out


def test_every_step_reported_and_none_failed(dry_run):
    proc, summary, out = dry_run
    assert summary["mode"] == "cpu-dry-run"
    assert list(summary["steps"]) == STEPS
    failed = {k: s.get("reason") for k, s in summary["steps"].items() if s["status"] == "fail"}
    assert not failed, f"{failed}\n{proc.stdout[-3000:]}"
    assert proc.returncode == 0 and summary["passed"]
    for step in summary["steps"].values():
        assert step["status"] in ("pass", "skipped") and step["seconds"] >= 0
        if step["status"] == "skipped":
            assert step["reason"]
    assert "GPU check (cpu-dry-run)" in proc.stdout  # the table
    assert (out / "logs").is_dir()
    assert summary["total_s"] < 300  # the dry run's budget is 240 s (plus the step in flight)


def test_environment(dry_run):
    _, summary, _ = dry_run
    env = summary["steps"]["env"]
    assert env["status"] == "pass"
    n = env["numbers"]
    assert n["cuda_available"] is False and n["preftune_import"] == "ok"
    assert {"torch", "transformers", "peft", "accelerate"} <= set(n["packages"])
    # what is absent is listed, not fatal
    for name, dist in (("trl", "trl"), ("liger_kernel", "liger-kernel")):
        assert (dist in summary["missing"]) == (importlib.util.find_spec(name) is None)


def test_cuda_tests_collected_and_skipped_without_gpu(dry_run):
    _, summary, _ = dry_run
    step = summary["steps"]["cuda_tests"]
    assert step["status"] == "skipped", step
    assert step["numbers"]["tests"] >= 1 and step["numbers"]["skipped"] == step["numbers"]["tests"]
    assert "tests/test_engine.py" in step["numbers"]["files"]
    assert "skipped" in step["reason"]


def test_parity_with_trl_on_cpu(dry_run):
    _, summary, _ = dry_run
    step = summary["steps"]["parity"]
    assert step["status"] == "pass", step
    cases = step["numbers"]["float32 tiny"]["cases"]
    assert set(cases) == {"cpo-sigmoid", "dpo-sigmoid", "orpo (loss - nll)", "rm"}
    for name, c in cases.items():
        assert c["passed"] and math.isfinite(c["trl_loss"]), name
        assert c["max_loss_diff"] <= 1e-4 and c["max_metric_diff"] <= 1e-3, name
        if name != "orpo (loss - nll)":  # ORPO's gradients differ by design (its NLL term)
            assert c["max_grad_rel_diff"] is not None and c["max_grad_rel_diff"] <= 1e-3, name


def test_torchrun_one_process_gloo(dry_run):
    _, summary, _ = dry_run
    step = summary["steps"]["torchrun"]
    assert step["status"] == "pass", step
    n = step["numbers"]
    assert n["backend"] == "gloo" and "--nproc_per_node 1 -m preftune.cli train" in n["command"]
    assert len(n["losses"]) == 2 and all(math.isfinite(x) for x in n["losses"])


def test_throughput_runs(dry_run):
    _, summary, _ = dry_run
    step = summary["steps"]["throughput"]
    assert step["status"] == "pass", step
    runs = step["numbers"]["runs"]
    got = {(r["tool"], r["length"]) for r in runs}
    assert {("preftune-dpo", 128), ("preftune-cpo", 128), ("preftune-dpo", 256)} <= got
    if importlib.util.find_spec("trl") is not None:
        assert {("trl-dpo", 128), ("trl-cpo", 128), ("trl-dpo", 256)} <= got
        assert step["numbers"]["comparisons"]
    for r in runs:
        assert r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0, r
        assert r["mfu"] is None  # no peak FLOP/s for a CPU
        assert len(r["step_s"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    skipped = step["numbers"]["skipped_runs"]
    if importlib.util.find_spec("liger_kernel") is None:
        assert {s["run"].split()[0] for s in skipped} == {"trl-dpo+liger", "trl-cpo+liger"}
        assert all("liger-kernel not installed" in s["reason"] for s in skipped)
    assert not step["numbers"]["failed_runs"]
