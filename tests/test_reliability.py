"""Fault injection and run safety (docs/reliability.md): kill -9 at several points then resume,
corrupted checkpoints, protected output directories, a shared reference cache, the non-finite guard.

Runs are CPO/DPO + LoRA on the tiny random model (tests/conftest.py). Kills are real: the run is a
``python -m preftune.cli train`` subprocess that SIGKILLs itself at a point named by
``$PREFTUNE_FAULT`` (preftune.faults.fault_point); resumes and references run in-process.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.cli_args import parse_groups
from preftune.config import ConfigError
from preftune.data.loading import demo_path
from preftune.errors import EXIT_NON_FINITE, NonFiniteError
from preftune.outputs import MARKER, latest_complete_checkpoint, prepare_output_dir, verify_complete
from preftune.train import save, setup, train

STEPS = 4


def flags(model_dir, out, *extra):
    return ["--model_name_or_path", model_dir, "--output_dir", str(out), "--use_peft", "--lora_r", "4",
            "--lora_alpha", "8", "--lora_dropout", "0.1", "--max_steps", str(STEPS), "--per_device_train_batch_size", "2",
            "--logging_steps", "1", "--learning_rate", "1e-2", "--max_length", "128", "--max_prompt_length", "64",
            "--seed", "5", "--save_strategy", "steps", "--save_steps", "1", "--dataloader_num_workers", "0",
            "--disable_tqdm", "true", "--dataset", f"{demo_path()}#16", *extra]


def run_cli(argv, env=None, wait=True):
    """``python -m preftune.cli`` in a subprocess with this process's thread count (same numerics)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "preftune.cli", *argv], env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


def adapter(path):
    return load_file(Path(path) / "adapter_model.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def history(out):
    return json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]


DPO = ["--loss", "dpo", "--per_device_eval_batch_size", "4"]  # reference pass: 4 batches of 4 pairs


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """A 4-step DPO run (reference log-probs precomputed) with a checkpoint after every step."""
    base = tmp_path_factory.mktemp("reliability")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFTUNE_REF_CACHE", str(base / "cache"))
        assert main(["train", *flags(tiny_model_dir, base / "full", *DPO)]) == 0
    return base / "full"


# ---- kill -9, then resume --------------------------------------------------------------------------
def test_killed_five_times_then_resumed_equals_uninterrupted(tiny_model_dir, tmp_path, uninterrupted):
    """One DPO run killed (SIGKILL) at five points in a row, each time restarted or resumed from `latest`."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["train", *flags(tiny_model_dir, out, *DPO)]
    resume = ["--resume_from_checkpoint", "latest"]

    def killed_at(fault, *extra):
        code, err = run_cli(argv + list(extra), env={"PREFTUNE_FAULT": fault, "PREFTUNE_REF_CACHE": str(cache)})
        assert code == -9, err[-3000:]

    # 1-2. during the reference pass (after its 2nd batch), then with the cache written but not renamed:
    # nothing half-written is published, and the directory holds no run (a plain restart is allowed)
    for fault in ("reference:2", "reference_write:1"):
        killed_at(fault)
        assert not list(cache.glob("*.pt")) and [p.name for p in out.iterdir()] == [".preftune.lock"]
    # 3. during step 2: after its backward, before its optimiser step
    killed_at("step:2")
    assert latest_complete_checkpoint(out).endswith("checkpoint-1") and not (out / "checkpoint-2").exists()
    assert main(argv) == 2  # a fresh run now refuses the directory
    # 4. resumed at 1; killed while writing checkpoint-3 (written, not yet renamed into place)
    killed_at("checkpoint_write:2", *resume)
    assert (out / ".partial-checkpoint-3").is_dir() and not (out / "checkpoint-3").exists()
    assert latest_complete_checkpoint(out).endswith("checkpoint-2")
    # 5. resumed at 2; killed with the final files staged, not yet moved into place
    killed_at("final_save:1", *resume)
    assert latest_complete_checkpoint(out).endswith("checkpoint-4")
    assert not (out / "adapter_model.safetensors").exists()
    # resumed at 4: nothing left to train, the final save completes
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFTUNE_REF_CACHE", str(cache))
        assert main(argv + resume) == 0
    diff = max_diff(adapter(uninterrupted), adapter(out))
    print(f"\nreliability: killed at 5 points, resumed: max |adapter - uninterrupted| = {diff:.3g}")
    assert diff <= 1e-6
    assert verify_complete(out) is None and not list(out.glob(".partial-*"))
    assert [h["loss"] for h in history(out) if "loss" in h] == pytest.approx(
        [h["loss"] for h in history(uninterrupted) if "loss" in h], abs=1e-6)


def test_corrupted_newest_checkpoint_falls_back(tiny_model_dir, tmp_path, uninterrupted, caplog, capsys):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    for name in ("adapter_model.safetensors", "trainer_state.json", MARKER):
        (out / name).unlink()
    blob = out / "checkpoint-4" / "adapter_model.safetensors"  # same size, one byte changed
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    (out / "checkpoint-3" / MARKER).unlink()  # what a partial write (or another tool) leaves
    caplog.set_level("WARNING", logger="preftune.outputs")
    assert latest_complete_checkpoint(out).endswith("checkpoint-2")
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert any("checkpoint-4" in w and "corrupted" in w for w in warnings), warnings
    assert any("checkpoint-3" in w and MARKER in w for w in warnings), warnings
    assert main(["train", *flags(tiny_model_dir, out, *DPO, "--resume_from_checkpoint", "latest")]) == 0
    diff = max_diff(adapter(uninterrupted), adapter(out))
    with capsys.disabled():
        print(f"\nreliability: resumed past 2 bad checkpoints: max |adapter - uninterrupted| = {diff:.3g}")
    assert diff <= 1e-6
    # an explicit path to a corrupted checkpoint is refused, not loaded
    ckpt2 = out / "checkpoint-2" / "adapter_model.safetensors"
    ckpt2.write_bytes(ckpt2.read_bytes()[:-7])
    assert main(["train", *flags(tiny_model_dir, out, *DPO, "--resume_from_checkpoint", str(out / "checkpoint-2"))]) == 2
    assert "corrupted checkpoint (adapter_model.safetensors has" in capsys.readouterr().err


# ---- output directories ----------------------------------------------------------------------------
def test_second_run_on_one_output_dir_refuses(tiny_model_dir, tmp_path, uninterrupted, capsys):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    assert main(["train", *flags(tiny_model_dir, out)]) == 2
    err = capsys.readouterr().err
    assert "is not empty: it holds a dpo run" in err and "4 checkpoints" in err and "--overwrite_output_dir" in err
    # resuming a DPO checkpoint as a CPO run: refused, the differing keys named
    assert main(["train", *flags(tiny_model_dir, out, "--lora_r", "8", "--resume_from_checkpoint", "latest")]) == 2
    err = capsys.readouterr().err
    assert "loss: 'dpo' → 'cpo'" in err and "lora_r: 4 → 8" in err, err
    # --overwrite_output_dir clears it: nothing of the DPO run is left
    assert main(["train", *flags(tiny_model_dir, out, "--max_steps", "1", "--save_strategy", "no",
                                 "--overwrite_output_dir")]) == 0
    assert not list(out.glob("checkpoint-*"))
    assert "loss: cpo" in (out / "preftune_config.yaml").read_text()
    # a directory of other files is never cleared
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    assert main(["train", *flags(tiny_model_dir, other, "--overwrite_output_dir")]) == 2
    assert "not a preftune run" in capsys.readouterr().err and (other / "thesis.tex").exists()


def test_concurrent_run_on_one_output_dir_refuses(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from preftune.outputs import lock_output_dir; lock_output_dir(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        out.mkdir()
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"another preftune run is using it \\(pid {holder.pid}\\)"):
            prepare_output_dir(parse_groups(flags(tiny_model_dir, out)))
    finally:
        holder.kill()
        holder.wait()
    prepare_output_dir(parse_groups(flags(tiny_model_dir, out)))  # free again once the holder is gone


def test_unwritable_output_dir_fails_before_loading(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    targets = [afile / "out"]
    if os.geteuid() != 0:  # root writes anywhere: a read-only directory only stops other users
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        targets.append(ro / "out")
    elif Path("/proc").is_dir():
        targets.append(Path("/proc/preftune-test-out"))
    for out in targets:
        # a model path that does not exist: the output directory is checked before anything is loaded
        assert main(["train", *flags("/nonexistent/model", out)]) == 2
        err = capsys.readouterr().err
        assert f"--output_dir {out} is not writable" in err and "Traceback" not in err, err


# ---- the reference cache ---------------------------------------------------------------------------
def _records(n, offset=0):
    return "".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
                               "rejected": f" Maybe {i + 7}, or not."}) + "\n" for i in range(offset, offset + n))


def test_two_runs_share_the_reference_cache_concurrently(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(_records(12))
    b.write_text(_records(12, offset=6))  # 6 shared pairs, 18 distinct
    dpo = ["--loss", "dpo", "--save_strategy", "no", "--max_steps", "1", "--per_device_eval_batch_size", "2"]
    procs = [run_cli(["train", *flags(tiny_model_dir, tmp_path / f"out-{d.stem}", "--dataset", str(d), *dpo)],
                     env={"PREFTUNE_REF_CACHE": str(cache)}, wait=False) for d in (a, b)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    (cache_file,) = cache.glob("*.pt")
    assert len(torch.load(cache_file, weights_only=True)) == 18  # both runs' entries, none lost
    for d in (a, b):
        step1 = history(tmp_path / f"out-{d.stem}")[0]
        # policy == reference at step 1 (LoRA B = 0): right reference values give zero rewards
        assert abs(step1["rewards/chosen"]) < 1e-5 and abs(step1["rewards/rejected"]) < 1e-5, step1


def test_reference_cache_loads_no_code(tmp_path, caplog):
    from preftune.engine.reference import _load_cache

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "cache.pt"
    torch.save({"k": Evil()}, path)
    assert _load_cache(path) == {} and not marker.exists()
    torch.save({"k": [1.0, 2.0]}, path)
    assert _load_cache(path) == {"k": [1.0, 2.0]}
    torch.save([1, 2], path)
    assert _load_cache(path) == {}


# ---- the non-finite guard --------------------------------------------------------------------------
def test_divergence_stops_with_the_guard_message(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *flags(tiny_model_dir, out, "--learning_rate", "1e30")]) == EXIT_NON_FINITE
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite values at step" in err and "records: " in err and "line " in err, err
    assert "no final model is saved" in err
    assert not (out / "adapter_model.safetensors").exists()
    ckpts = sorted(out.glob("checkpoint-*"))
    if ckpts:  # every checkpoint written is finite, and the message names the newest one
        assert f"last finite checkpoint: {latest_complete_checkpoint(out)}" in err
        for ckpt in ckpts:
            assert all(torch.isfinite(t).all() for t in adapter(ckpt).values())
            assert all(not (isinstance(v, float) and math.isnan(v)) for h in history(ckpt) for v in h.values())
    else:
        assert "no checkpoint was saved" in err


class _NanAt:
    """Wrap ``batch_loss_and_metrics``: the loss of the given training calls becomes NaN."""

    def __init__(self, trainer, calls):
        self.inner, self.calls, self.n = trainer.batch_loss_and_metrics, set(calls), 0

    def __call__(self, model, batch, *args):
        loss, metrics = self.inner(model, batch, *args)
        if model.training:
            self.n += 1
            if self.n in self.calls:
                loss = loss * float("nan")
        return loss, metrics


def test_skip_batch_skips_counts_and_stops(tiny_model_dir, tmp_path):
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def __init__(self):
            self.weights = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.named_parameters()
                                               if v.requires_grad}

    run = setup(parse_groups(flags(tiny_model_dir, tmp_path / "skip", "--nan_policy", "skip_batch",
                                   "--save_strategy", "no")))
    run.trainer.batch_loss_and_metrics = _NanAt(run.trainer, {2})
    snaps = Snapshots()
    run.trainer.add_callback(snaps)
    metrics = train(run)
    logs = [h for h in run.trainer.state.log_history if "loss" in h]
    assert [h["skipped_batches"] for h in logs] == [0, 1, 1, 1]
    assert math.isnan(logs[1]["loss"])  # the skipped step's loss is shown as it was, never as 0
    assert all(math.isfinite(h["loss"]) and h["loss"] != 0 for h in (logs[0], logs[2], logs[3]))
    assert metrics["skipped_batches"] == 1 and math.isfinite(metrics["train_loss"])
    assert all(torch.equal(snaps.weights[1][k], snaps.weights[2][k]) for k in snaps.weights[1])  # not applied
    assert any(not torch.equal(snaps.weights[2][k], snaps.weights[3][k]) for k in snaps.weights[2])
    # nothing non-finite is ever saved: a NaN weight stops the final save
    name, param = next((n, p) for n, p in run.model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite weights before the final save"):
        save(run, metrics)
    assert not (tmp_path / "skip" / "adapter_model.safetensors").exists()

    run = setup(parse_groups(flags(tiny_model_dir, tmp_path / "skip-max", "--nan_policy", "skip_batch",
                                   "--max_skipped_batches", "1", "--save_strategy", "no")))
    run.trainer.batch_loss_and_metrics = _NanAt(run.trainer, {2, 3})
    with pytest.raises(NonFiniteError, match=r"at step 3 .*skipped 2 times, more than --max_skipped_batches 1"):
        train(run)



def test_skip_batch_under_the_fp16_grad_scaler_applies_nothing():
    """A skipped update under the fp16 GradScaler: the Trainer's norm computation has unscaled the
    gradients already (the scaler's inf check is done), so the skip must take the gradients away
    rather than fill them with inf (which the optimiser would then apply)."""
    from types import SimpleNamespace

    from preftune.guard import GuardedTrainerMixin, NonFiniteGuard

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in model.parameters()]

    class Base:
        def _get_grad_norm(self, model, grad_norm=None):  # the Trainer: accelerate unscales, then the norm
            scaler.unscale_(optimizer)
            return torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))

    class Trainer(GuardedTrainerMixin, Base):
        pass

    trainer = Trainer()
    trainer.accelerator = SimpleNamespace(scaler=scaler)
    trainer.state = SimpleNamespace(global_step=0)
    trainer._tr_loss = torch.zeros(())
    trainer._guard = NonFiniteGuard("skip_batch", max_skipped_batches=5)
    loss = model(torch.randn(3, 4)).sum()
    assert not trainer.guard.check_batch(1, torch.tensor(float("nan")), {}, lambda: [])  # a bad micro-batch
    scaler.scale(loss).backward()
    trainer._get_grad_norm(model)
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert trainer.guard.skipped == 1


def test_skip_batch_with_deepspeed_is_refused_in_one_line():
    from types import SimpleNamespace

    from preftune.guard import check_nan_policy

    check_nan_policy(SimpleNamespace(nan_policy="skip_batch", deepspeed=None))
    check_nan_policy(SimpleNamespace(nan_policy="stop", deepspeed="zero2.json"))
    with pytest.raises(ConfigError, match="skip_batch does not work with --deepspeed"):
        check_nan_policy(SimpleNamespace(nan_policy="skip_batch", deepspeed="zero2.json"))


@pytest.mark.parametrize("again", ["latest", "plain"])
def test_killed_before_the_first_checkpoint_then_resume_latest_starts_again(tiny_model_dir, tmp_path, uninterrupted,
                                                                            again):
    """Killed while writing the first checkpoint: `--resume_from_checkpoint latest` (what the docs say to
    do), or the same command again (a partial write never blocks a restart of the same run), starts again
    from step 0 — the partial write removed — and ends with the uninterrupted weights; another
    configuration in that directory is still refused, both ways."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["train", *flags(tiny_model_dir, out, *DPO)]
    code, err = run_cli(argv, env={"PREFTUNE_FAULT": "checkpoint_write:1", "PREFTUNE_REF_CACHE": str(cache)})
    assert code == -9, err[-3000:]
    assert (out / ".partial-checkpoint-1").is_dir() and latest_complete_checkpoint(out) is None
    assert main(argv + ["--beta", "0.5"]) == 2  # another run's config: refused (the directory holds a run)
    assert main(argv + ["--resume_from_checkpoint", "latest", "--beta", "0.5"]) == 2
    assert (out / ".partial-checkpoint-1").is_dir()  # nothing removed by the refusals
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFTUNE_REF_CACHE", str(cache))
        assert main(argv + (["--resume_from_checkpoint", "latest"] if again == "latest" else [])) == 0
    assert max_diff(adapter(uninterrupted), adapter(out)) <= 1e-6
    assert verify_complete(out) is None and not list(out.glob(".partial-*"))


def test_killed_at_ten_random_points_then_resumed_equals_uninterrupted(tiny_model_dir, tmp_path, uninterrupted):
    """kill -9 at 10 points drawn at random (seeded) from every phase a run goes through: the reference
    pass and its cache write, a step, a checkpoint write, the final save; the first kill always before the
    first checkpoint. After each, `--resume_from_checkpoint latest` continues (from step 0 while no
    checkpoint is complete); the final adapter equals the uninterrupted run's."""
    import random

    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["train", *flags(tiny_model_dir, out, *DPO), "--resume_from_checkpoint", "latest"]
    rng, kills = random.Random(25), []
    while len(kills) < 10:
        done = latest_complete_checkpoint(out) if out.exists() else None
        left = STEPS - (int(done.rsplit("-", 1)[1]) if done else 0)
        # at most one checkpoint gained per kill, so the kills spread over the run; the final save once
        # every step is done (the first kill is then always before the first checkpoint)
        phases = {"step": range(1, min(left, 2) + 1), "checkpoint_write": range(1, min(left, 2) + 1),
                  "final_save": range(1, 1 if left else 2)}
        if not list(cache.glob("*.pt")):  # the reference pass runs (4 batches), then its cache is written
            phases.update(reference=range(1, 5), reference_write=range(1, 2))
        phase = rng.choice([name for name, counts in phases.items() if counts])  # a phase, then which time
        fault = f"{phase}:{rng.choice(phases[phase])}"
        code, err = run_cli(argv, env={"PREFTUNE_FAULT": fault, "PREFTUNE_REF_CACHE": str(cache)})
        assert code == -9, f"{kills} then {fault}: {err[-3000:]}"
        kills.append(f"{fault} from {done.rsplit('/', 1)[1] if done else 'step 0'}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFTUNE_REF_CACHE", str(cache))
        assert main(argv) == 0
    diff = max_diff(adapter(uninterrupted), adapter(out))
    print(f"\nreliability: killed at {kills}: max |adapter - uninterrupted| = {diff:.3g}")
    assert diff <= 1e-6
    assert verify_complete(out) is None and not list(out.glob(".partial-*"))
