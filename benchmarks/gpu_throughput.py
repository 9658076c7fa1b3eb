"""One throughput measurement of the GPU check, in its own process: preftune or TRL 1.16 training a
random-initialised model of a real shape on synthetic pairs.

    python benchmarks/gpu_throughput.py SPEC.json OUT.json      # SPEC: one spec, or a list (one process for all)

``SPEC``: ``tool`` (``preftune-dpo``, ``preftune-cpo``, ``trl-dpo``, ``trl-cpo``), ``liger`` (TRL's
``use_liger_kernel=True``), ``shape`` (``gpu_shapes.SHAPES``), ``length`` (tokens of the shared-prompt
unit ``[P C R]``; ``[P C] = [P R] = 3/4 length``), ``batch`` (pairs per step), ``warmup`` / ``steps``,
``device`` (``cuda`` / ``cpu``), ``dtype`` (of the weights), ``bf16`` (the Trainer's mixed-precision
flag; None: the tool's default).

Both tools are built the same way, from the same model object and records: preftune through its
TRL-shaped API (``preftune.trl``), TRL through its own trainers, each with its defaults otherwise
(TRL: gradient checkpointing on, DPO reference computed every step by a model copy; preftune: its
memory-budget checkpointing, DPO reference log-probs precomputed at set-up, counted in ``setup_s``).

Measured per step (``bench_worker.StepRecorder`` plus a ``torch.cuda.synchronize`` at each step's
edges): wall seconds, loss, tokens the model ran (``real``) and padded; per run: tokens/s over the
*logical* tokens ``2|P| + |C| + |R|`` of the pairs (the same workload for both tools, whatever layout
each uses), peak ``torch.cuda.max_memory_allocated`` (CUDA) or peak RSS (CPU) over training, and MFU =
model FLOPs of the policy's training on the logical tokens (``gpu_shapes.train_flops_per_token``; a
reference forward is not counted) / step time / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gpu_shapes  # noqa: E402
import torch  # noqa: E402


def _training_kwargs(spec: dict, out_dir: str) -> dict:
    import dataclasses

    from transformers import TrainingArguments

    kw = dict(output_dir=out_dir, per_device_train_batch_size=spec["batch"], max_steps=spec["warmup"] + spec["steps"],
              learning_rate=1e-6, logging_steps=1000, save_strategy="no", report_to="none", seed=0,
              dataloader_num_workers=0, disable_tqdm=True, max_length=spec["length"], use_cpu=spec["device"] == "cpu")
    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}:  # not in every 5.x
        kw["train_sampling_strategy"] = "sequential"
    if spec.get("bf16") is not None:
        kw["bf16"] = spec["bf16"]
    return kw


def build(spec: dict, out_dir: str, model, tok, records):
    loss = spec["tool"].split("-", 1)[1]
    kw = _training_kwargs(spec, out_dir)
    if spec["tool"].startswith("preftune"):
        from preftune import trl as pt

        if loss == "cpo":
            return pt.CPOTrainer(model=model, args=pt.CPOConfig(**kw, beta=0.1, cpo_alpha=1.0),
                                 train_dataset=records, processing_class=tok)
        return pt.DPOTrainer(model=model, args=pt.DPOConfig(**kw, beta=0.1), train_dataset=records,
                             processing_class=tok)
    from datasets import Dataset

    data = Dataset.from_list(records)
    if spec.get("liger"):
        kw["use_liger_kernel"] = True
    if loss == "cpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOTrainer(model=model, args=CPOConfig(**kw, beta=0.1, cpo_alpha=1.0, loss_type="sigmoid"),
                          train_dataset=data, processing_class=tok)
    from trl import DPOConfig, DPOTrainer

    # TRL given a model id loads a second copy as the reference; given a model object, the copy is passed
    ref = copy.deepcopy(model)
    return DPOTrainer(model=model, ref_model=ref, args=DPOConfig(**kw, beta=0.1, loss_type=["sigmoid"]),
                      train_dataset=data, processing_class=tok)


def run(spec: dict) -> dict:
    import bench_worker
    from transformers import TrainerCallback

    warnings.filterwarnings("ignore")
    cuda = spec["device"].startswith("cuda")
    if not cuda:
        torch.set_flush_denormal(True)  # as bench_worker: the same CPU numerics for both tools
    tok = gpu_shapes.byte_tokenizer()
    n_pairs = spec["batch"] * (spec["warmup"] + spec["steps"])
    records = gpu_shapes.synthetic_records(n_pairs, spec["length"])
    t0 = time.perf_counter()
    # initialised on the device (a 1B model's random init takes seconds on the host); the trainers keep it there
    model = gpu_shapes.make_model(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=spec["device"])
    with tempfile.TemporaryDirectory(prefix="gpu-tput-") as out_dir:
        trainer = build(spec, out_dir, model, tok, records)
        setup_s = time.perf_counter() - t0

        class _Sync(TrainerCallback):  # before the recorder's timer: every step's kernels are inside its time
            def on_step_begin(self, *a, **k):
                if cuda:
                    torch.cuda.synchronize()

            def on_step_end(self, *a, **k):
                if cuda:
                    torch.cuda.synchronize()

        trainer.add_callback(_Sync())
        rec = bench_worker.StepRecorder(trainer, spec["warmup"])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            bench_worker.reset_peak_rss()
        trainer.train()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else bench_worker.peak_rss_mb()
    tok_lens = [(len(tok(r["prompt"])["input_ids"]), len(tok(r["chosen"])["input_ids"]) + 1,
                 len(tok(r["rejected"])["input_ids"]) + 1) for r in records]
    logical = [2 * p + c + r for p, c, r in tok_lens]
    b, w = spec["batch"], spec["warmup"]
    measured = rec.times[w:]
    step_logical = [sum(logical[i * b:(i + 1) * b]) for i in range(len(rec.times))][w:]
    seconds = sum(measured)
    tps = sum(step_logical) / seconds if seconds > 0 else float("nan")
    context = max(p + max(c, r) for p, c, r in tok_lens)
    flops_per_token = gpu_shapes.train_flops_per_token(spec["shape"], context)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak_flops = gpu_shapes.peak_flops(name) if cuda else None
    mfu = tps * flops_per_token / peak_flops if peak_flops else None
    return {"tool": spec["tool"] + ("+liger" if spec.get("liger") else ""), "shape": spec["shape"],
            "length": spec["length"], "batch": b, "device_name": name, "setup_s": setup_s, "step_s": rec.times,
            "losses": rec.losses, "real_tokens": rec.real, "padded_tokens": rec.padded,
            "logical_tokens_per_step": step_logical, "tokens_per_s": tps,
            "peak_memory_mb": peak, "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS",
            "flops_per_token": flops_per_token, "peak_flops": peak_flops, "mfu": mfu,
            "finite_losses": all(math.isfinite(x) for x in rec.losses) and bool(rec.losses),
            "checkpointed_layers": bench_worker._checkpointed_layers(trainer.model)}


def main() -> None:
    """One spec → one result; a list of specs (the CPU dry run: one process start for all) → a list of
    results, where a run that raises is ``{"error": ...}`` and the others still run."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("PREFTUNE_REF_CACHE", tempfile.mkdtemp(prefix="gpu-tput-ref-"))
    if isinstance(spec, dict):
        Path(sys.argv[2]).write_text(json.dumps(run(spec)))
        return
    results = []
    for one in spec:
        try:
            results.append(run(one))
        except Exception as exc:  # noqa: BLE001 - reported per run
            import traceback

            results.append({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-1500:]})
        Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
