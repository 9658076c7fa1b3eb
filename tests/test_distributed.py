"""Several processes: torchrun with 2 CPU processes (gloo) against one process, same data.

The global batch is split three ways — 2 ranks x B, 1 rank x B x 2 accumulation steps, 1 rank x 2B —
and every split must end with the same weights (SGD, lr 1e-2, no LoRA dropout: nothing random is
drawn per micro-batch) and log the same losses and metrics, for CPO (an NLL token mean over the
batch, LoRA, length-grouped sampler) and DPO with precomputed reference log-probs (full
fine-tuning); the same under FSDP2 (2 CPU processes) and DeepSpeed ZeRO-2 / ZeRO-3 when deepspeed
is installed; a 2-rank run resumed from its checkpoint (``latest``) ends where the uninterrupted one
does; only rank 0 writes (per-rank audit of written paths, ``tests/distributed_worker.py``).

A ``torchrun`` start costs seconds, so each launch runs several trainings (the worker calls the
CLI's ``main`` for each); the one-process runs happen in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")

HERE = Path(__file__).parent
TOL = 1e-5


def common(model_dir: str) -> list[str]:
    return ["--model_name_or_path", model_dir, "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2",
            "--optim", "sgd", "--save_strategy", "no", "--seed", "3", "--dataloader_num_workers", "0",
            "--report_to", "none"]


def cpo(model_dir, out, batch, *extra):  # LoRA, length-grouped batches, NLL token mean (cpo_alpha 1)
    return ["train", *common(model_dir), "--loss", "cpo", "--use_peft", "--lora_r", "4", "--lora_dropout", "0",
            "--train_sampling_strategy", "group_by_length", "--per_device_train_batch_size", str(batch),
            "--output_dir", str(out), *extra]


def dpo(model_dir, out, batch, *extra):  # full fine-tuning, reference log-probs precomputed once
    return ["train", *common(model_dir), "--loss", "dpo", "--precompute_ref_log_probs", "true",
            "--per_device_train_batch_size", str(batch), "--output_dir", str(out), *extra]


def cpo_full(model_dir, out, batch, *extra):
    return ["train", *common(model_dir), "--loss", "cpo", "--per_device_train_batch_size", str(batch),
            "--output_dir", str(out), *extra]


FSDP = ["--fsdp", "full_shard auto_wrap", "--fsdp_config",
        json.dumps({"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                    "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True})]


def torchrun(tmp_path: Path, name: str, command: list[str], ref_cache: Path, timeout: int = 600):
    """Run ``torchrun --nproc_per_node 2 <command>``; returns the completed process (stdout+stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFTUNE_REF_CACHE": str(ref_cache), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command]
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"  # files: a timeout still leaves the logs
    with open(out, "w") as fo, open(err, "w") as fe:
        code = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=fo, stderr=fe, timeout=timeout).returncode
    proc = subprocess.CompletedProcess(cmd, code, out.read_text(), err.read_text())
    assert code == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def launch_runs(tmp_path: Path, name: str, runs: list[list[str]], ref_cache: Path):
    """Several trainings in one 2-process launch, with the per-rank audit of written paths."""
    audit = tmp_path / f"audit-{name}"
    audit.mkdir()
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"audit_dir": str(audit), "runs": runs}))
    proc = torchrun(tmp_path, name, [str(HERE / "distributed_worker.py"), str(spec)], ref_cache)
    written = {r: json.loads((audit / f"rank{r}.json").read_text()) for r in (0, 1)}
    return proc, written


def weights(out: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(out / name))


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def train_logs(out: Path) -> list[dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h]


def assert_same_logs(a: Path, b: Path) -> None:
    la, lb = train_logs(a), train_logs(b)
    assert len(la) == len(lb) == 2
    for x, y in zip(la, lb):
        for key in ("loss", "nll_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), key
        assert x["logical_tokens_seen"] == y["logical_tokens_seen"]  # summed over the ranks


def rank1_writes(written: dict, roots: list[Path]) -> list[str]:
    """Paths under ``roots`` that rank 1 created or wrote, except the output directory itself and
    the writability probe every rank makes (created and removed at once)."""
    roots = [str(r.resolve()) for r in roots]
    bad = []
    for p in written[1]:
        if any(p == r for r in roots) or "/.preftune-probe-" in p:
            continue
        if any(p.startswith(r + os.sep) for r in roots):
            bad.append(p)
    return bad


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """One 2-process launch (CPO/LoRA, DPO/full, an uninterrupted 4-step run with a checkpoint at
    step 2, then FSDP), and the one-process runs of the same trainings in this process."""
    tmp = tmp_path_factory.mktemp("dist")
    ref_ddp = tmp / "ref-ddp"
    out = {name: tmp / name for name in ("cpo_ddp", "dpo_ddp", "resume_full", "cpo_fsdp", "dpo_live_fsdp")}
    proc, written = launch_runs(tmp, "ddp", [
        cpo(tiny_model_dir, out["cpo_ddp"], 2),
        dpo(tiny_model_dir, out["dpo_ddp"], 2),
        cpo(tiny_model_dir, out["resume_full"], 2, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"),
        cpo_full(tiny_model_dir, out["cpo_fsdp"], 2, *FSDP),
        # full fine-tuning with a live reference model, sharded for evaluation like the policy
        dpo(tiny_model_dir, out["dpo_live_fsdp"], 2, "--precompute_ref_log_probs", "false", *FSDP),
    ], ref_ddp)
    single = {}
    for name, argv in (("cpo_one", cpo(tiny_model_dir, tmp / "cpo_one", 4)),
                       ("cpo_ga", cpo(tiny_model_dir, tmp / "cpo_ga", 2, "--gradient_accumulation_steps", "2")),
                       ("dpo_one", dpo(tiny_model_dir, tmp / "dpo_one", 4)),
                       ("dpo_ga", dpo(tiny_model_dir, tmp / "dpo_ga", 2, "--gradient_accumulation_steps", "2")),
                       ("cpo_full_one", cpo_full(tiny_model_dir, tmp / "cpo_full_one", 4))):
        assert main(argv) == 0, name
        single[name] = tmp / name
    yield {"tmp": tmp, "out": out, "single": single, "proc": proc, "written": written, "ref_ddp": ref_ddp,
           "model": tiny_model_dir}
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("loss", ["cpo", "dpo"])
def test_two_ranks_accumulation_and_one_big_batch_agree(runs, loss):
    one, ga, ddp = runs["single"][f"{loss}_one"], runs["single"][f"{loss}_ga"], runs["out"][f"{loss}_ddp"]
    assert max_diff(one, ga) <= TOL
    assert max_diff(one, ddp) <= TOL
    # the updates were real: LoRA's B matrices left zero, the full model left its initial weights
    trained = weights(ddp)
    if loss == "cpo":
        assert max(float(v.abs().max()) for k, v in trained.items() if "lora_B" in k) > 1e-4
    else:
        start = load_file(str(Path(runs["model"]) / "model.safetensors"))
        assert max(float((start[k] - v).abs().max()) for k, v in trained.items() if k in start) > 1e-4
    assert_same_logs(one, ddp)  # logged loss and metrics: the mean over the ranks equals the 1-rank value
    assert_same_logs(one, ga)


def test_fsdp_two_cpu_processes_agree(runs):
    assert "switched to FSDP" in runs["proc"].stderr  # it ran sharded (not accelerate's DDP fallback)
    assert max_diff(runs["single"]["cpo_full_one"], runs["out"]["cpo_fsdp"]) <= TOL
    assert_same_logs(runs["single"]["cpo_full_one"], runs["out"]["cpo_fsdp"])


def test_fsdp_live_reference_model_agrees(runs):
    """DPO, full fine-tuning, the reference model live in every step and sharded like the policy (two
    CPU processes, FSDP2) = the one-process run with precomputed reference log-probs."""
    assert max_diff(runs["single"]["dpo_one"], runs["out"]["dpo_live_fsdp"]) <= TOL
    assert_same_logs(runs["single"]["dpo_one"], runs["out"]["dpo_live_fsdp"])


def test_only_rank_zero_writes_and_results_print_once(runs):
    out, written = runs["out"], runs["written"]
    roots = [*out.values(), runs["ref_ddp"]]
    # rank 1 writes only its own RNG state into the checkpoints (needed to resume exactly; the Trainer
    # makes the checkpoint directory for it)
    bad = [p for p in rank1_writes(written, roots)
           if not (p.endswith("rng_state_1.pth") or re.search(r"/checkpoint-\d+$", p))]
    assert bad == [], bad
    assert any(p.startswith(str(out["cpo_ddp"].resolve())) and p.endswith("trainer_state.json") for p in written[0])
    assert list(runs["ref_ddp"].glob("*.pt")), "the reference cache was written (by rank 0)"
    assert runs["proc"].stdout.count('"train_loss"') == 5  # one result print per run, from the main process
    logs = runs["proc"].stderr
    assert logs.count("reference log-probs for") == 1 and "56 computed over 2 processes" in logs  # logged once
    assert logs.count("saved to") == 5


def test_resume_latest_of_two_rank_run(runs, tmp_path):
    full = runs["out"]["resume_full"]
    assert (full / "checkpoint-2").is_dir() and (full / "checkpoint-4").is_dir()
    cut = tmp_path / "resume_cut"
    cut.mkdir()
    shutil.copytree(full / "checkpoint-2", cut / "checkpoint-2")  # as if killed after step 2
    preftune = Path(sys.executable).with_name("preftune")
    command = ["--no-python", str(preftune)] if preftune.exists() else ["-m", "preftune.cli"]
    args = cpo(runs["model"], cut, 2, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
               "--resume_from_checkpoint", "latest")
    proc = torchrun(tmp_path, "resume", [*command, *args], tmp_path / "ref")
    assert "resuming from" in proc.stdout + proc.stderr
    assert max_diff(full, cut) <= TOL
    a = [h for h in train_logs(full) if h["step"] > 2]
    b = [h for h in train_logs(cut) if h["step"] > 2]
    assert [h["step"] for h in b] == [3, 4]
    assert [h["loss"] for h in b] == pytest.approx([h["loss"] for h in a], rel=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero2_and_zero3_on_cpu(runs, tmp_path):
    zero = {}
    for stage in (2, 3):
        cfg = {"zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
               "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
               "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}
        zero[stage] = tmp_path / f"zero{stage}.json"
        zero[stage].write_text(json.dumps(cfg))
    z2, z3 = tmp_path / "cpo_zero2", tmp_path / "dpo_zero3"
    _, written = launch_runs(tmp_path, "deepspeed", [
        cpo_full(runs["model"], z2, 2, "--deepspeed", str(zero[2])),
        dpo(runs["model"], z3, 2, "--deepspeed", str(zero[3])),  # weights partitioned at load; reference gathered
    ], tmp_path / "ref")
    assert max_diff(runs["single"]["cpo_full_one"], z2) <= TOL
    assert max_diff(runs["single"]["dpo_one"], z3) <= TOL
    assert_same_logs(runs["single"]["dpo_one"], z3)
    assert rank1_writes(written, [z2, z3, tmp_path / "ref"]) == []


# ---- in-process pieces ---------------------------------------------------------------------------


def test_global_normalisers_make_the_loss_split_invariant():
    """Each part's sum of per-pair losses / N, with the whole batch's N and T, adds up to the full batch
    mean, for every NLL-carrying loss, whatever the split (value and gradient)."""
    from preftune.losses import get_loss_fn
    from preftune.types import PolicyLogps

    g = torch.Generator().manual_seed(0)
    n = 6
    chosen = (-torch.rand(n, generator=g, dtype=torch.float64) * 40).requires_grad_()
    rejected = -torch.rand(n, generator=g, dtype=torch.float64) * 40
    lc = torch.randint(3, 30, (n,), generator=g).double()
    lr = torch.randint(3, 30, (n,), generator=g).double()
    ref_c, ref_r = chosen.detach() + 1.0, rejected - 0.5
    cases = {"cpo": {}, "simpo": {"cpo_alpha": 0.7}, "cpo-simpo": {}, "dpo": {"rpo_alpha": 0.5}, "sft": {}}
    for name, kw in cases.items():
        fn = get_loss_fn(name)

        def part(idx, fn=fn, kw=kw, **norm):
            return fn(PolicyLogps(chosen[idx], rejected[idx], lc[idx], lr[idx], ref_c[idx], ref_r[idx]), **kw, **norm)

        full = part(slice(None)).losses.mean()
        (g_full,) = torch.autograd.grad(full, chosen)
        for split in ([slice(0, 3), slice(3, 6)], [slice(0, 1), slice(1, 6)], [slice(0, 2), slice(2, 4), slice(4, 6)]):
            total = sum(part(s, num_pairs_total=n, nll_normaliser=float(lc.sum())).losses.sum() / n for s in split)
            (g_split,) = torch.autograd.grad(total, chosen)
            assert float(total.detach()) == pytest.approx(float(full.detach()), rel=1e-12), name
            assert torch.allclose(g_split, g_full, rtol=1e-12, atol=0), name
            if name in ("cpo", "sft", "dpo"):  # the per-batch means differ when the batch is uneven: the point
                naive = sum(part(s).losses.mean() * (s.stop - s.start) / n for s in split)
                assert abs(float(naive) - float(full)) > 1e-9 or len({s.stop - s.start for s in split}) == 1


def test_normalisers_reject_nonpositive():
    from preftune.losses import chosen_nll

    with pytest.raises(ValueError, match="nll_normaliser must be > 0"):
        chosen_nll(torch.tensor([-1.0]), torch.tensor([2.0]), nll_normaliser=0)
    with pytest.raises(ValueError, match="num_pairs_total must be > 0"):
        chosen_nll(torch.tensor([-1.0]), torch.tensor([2.0]), num_pairs_total=-1)


def test_global_length_grouped_sampler_same_on_every_rank_and_grouped_per_step():
    from preftune.distributed import GlobalLengthGroupedSampler

    lengths = [(i * 37) % 101 + 1 for i in range(64)]
    per_device, ranks = 4, 2
    a = GlobalLengthGroupedSampler(lengths, per_device * ranks, seed=5)
    b = GlobalLengthGroupedSampler(lengths, per_device * ranks, seed=5)
    order = list(a)
    assert order == list(b) and sorted(order) == list(range(64))  # every rank draws the same permutation
    a.set_epoch(1)
    assert list(a) != order  # a new order each epoch
    # dealt round-robin (accelerate): rank r gets batches r, r + 2, ...; a rank's batch is length-homogeneous
    batches = [order[i:i + per_device] for i in range(0, 64, per_device)]
    spread = [max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in batches]
    assert sum(spread) / len(spread) < 0.5 * (max(lengths) - min(lengths))
    with pytest.raises(ValueError):
        GlobalLengthGroupedSampler(lengths, 0)


def test_forward_through_runs_hooks_and_restores_forward():
    from preftune.distributed import forward_through, inner_module

    model = torch.nn.Linear(3, 2)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    model.register_forward_hook(lambda m, args, out: seen.append("post"))
    x = torch.randn(4, 3)
    out = forward_through(model, lambda m: {"y": m.weight.sum() + x.sum()})
    assert seen == ["pre", "post"] and set(out) == {"y"}
    assert "forward" not in model.__dict__ and torch.equal(model(x), x @ model.weight.T + model.bias)
    wrapped = torch.nn.DataParallel(model)
    assert inner_module(wrapped) is model
    assert forward_through(wrapped, lambda m: m is model)


def test_forward_through_gives_ddp_with_device_ids_an_input():
    """DDP built with ``device_ids`` (GPUs) moves the call's inputs with ``_to_kwargs`` and takes the
    first: a call without inputs fails there (IndexError) before the forward runs. A wrapper named
    like DDP that does exactly that stands in for it (no GPU here)."""
    from torch.distributed.utils import _to_kwargs

    from preftune.distributed import forward_through

    class DistributedDataParallel(torch.nn.Module):  # the name inner_module unwraps
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *inputs, **kwargs):
            moved, moved_kwargs = _to_kwargs(inputs, kwargs, torch.device("cpu"), False)
            return self.module(*moved[0], **moved_kwargs[0])

    with pytest.raises(IndexError):  # what DDP does with no inputs
        DistributedDataParallel(torch.nn.Linear(3, 2))()
    inner = torch.nn.Linear(3, 2)
    out = forward_through(DistributedDataParallel(inner), lambda m: {"w": m.weight.sum()})
    assert torch.equal(out["w"], inner.weight.sum())


def test_metrics_reduce_without_process_group():
    from preftune.distributed import global_counts, reduce_stored_metrics

    means, sums = reduce_stored_metrics({"a": [1.0, 3.0], "b": []}, {"tokens": 7})
    assert means == {"a": 2.0} and sums == {"tokens": 7}
    batches = [{"num_pairs": torch.tensor(2), "target_seq": torch.tensor([0, 0, 1, 2, 3, 3])},
               {"num_pairs": torch.tensor(1), "target_seq": torch.tensor([0, 1, 1])}]
    counts = global_counts(batches)
    assert (counts.pairs, counts.chosen_tokens, counts.world_size) == (3, 4, 1)
    assert counts.share(2) == pytest.approx(2 / 3)
