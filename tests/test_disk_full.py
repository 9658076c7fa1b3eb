"""A full disk (issue 25): checked before the first save, handled at every write.

No root tricks: the free space is what ``preftune.outputs.space.free_bytes`` reports (patched), and a
write that fails is ``torch.save`` / ``save_adapter`` raising what they raise on a full disk
(``OSError(ENOSPC)``, or torch's zip writer's ``RuntimeError``). Each failure must end the run with
exit status 4 and one line naming the directory and the bytes, leave no partial directory and no
held lock, and a rerun with ``--resume_from_checkpoint latest`` must finish.
"""

import errno
import fcntl
import os
from pathlib import Path

import pytest
import torch

import preftune.outputs.space as space
from preftune.cli import main
from preftune.data.loading import demo_path
from preftune.errors import EXIT_DISK_FULL, DiskFullError
from preftune.outputs import lock_output_dir, release_output_dir

PREFIX = "preftune train: error: "


def argv(model_dir, out, *extra):
    return ["train", "--model_name_or_path", model_dir, "--output_dir", str(out), "--use_peft", "true",
            "--lora_r", "4", "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
            "--max_length", "96", "--max_prompt_length", "48", "--save_strategy", "steps", "--save_steps", "1",
            "--report_to", "none", "--disable_tqdm", "true", "--dataset", f"{demo_path()}#4", *extra]


def one_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def lock_is_free(out: Path) -> bool:
    """Another process's view: can the output directory's lock be taken now?"""
    fd = os.open(out / ".preftune.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def finish_after_freeing_space(model_dir, out):
    assert main(argv(model_dir, out, "--resume_from_checkpoint", "latest")) == 0
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob(".partial-*"))


def test_too_little_space_for_a_checkpoint_fails_before_training(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Free space below the expected checkpoint size: refused once the model is loaded, before step 1."""
    out = tmp_path / "run"
    monkeypatch.setattr(space, "free_bytes", lambda directory: space.MIN_FREE + 10)
    assert main(argv(tiny_model_dir, out)) == EXIT_DISK_FULL
    line = one_error(capsys.readouterr().err)
    assert str(out) in line and "a checkpoint: needs about" in line and f"{space.MIN_FREE + 10} free" in line
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".partial-*")) and lock_is_free(out)
    monkeypatch.undo()
    finish_after_freeing_space(tiny_model_dir, out)


@pytest.mark.parametrize("failure", ["enospc", "zip_writer"])
def test_disk_full_while_writing_a_checkpoint(tiny_model_dir, tmp_path, capsys, monkeypatch, failure):
    """The optimizer state of checkpoint-1 cannot be written: the partial checkpoint is removed, one
    line names the directory and the bytes, exit 4, the lock is free; with space again, `latest` finishes."""
    out = tmp_path / "run"
    real_save, full = torch.save, []

    def full_disk_save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            full.append(True)  # from now on the file system reports 4 KiB free
            if failure == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4368")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(space, "free_bytes", lambda directory: 4096 if full else 1 << 40)
    assert main(argv(tiny_model_dir, out)) == EXIT_DISK_FULL
    line = one_error(capsys.readouterr().err)
    assert str(out) in line and "checkpoint-1" in line and "needs about" in line and "4096 free" in line
    assert "--resume_from_checkpoint latest" in line
    assert not list(out.glob(".partial-*")) and not list(out.glob("checkpoint-*")) and lock_is_free(out)
    monkeypatch.undo()
    finish_after_freeing_space(tiny_model_dir, out)


def test_disk_full_during_the_final_save(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The adapter cannot be written at the end: .partial-final removed, the checkpoints kept, exit 4."""
    import preftune.models.peft

    out = tmp_path / "run"

    def no_space(model, directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / "adapter_model.safetensors"))

    monkeypatch.setattr(preftune.models.peft, "save_adapter", no_space)
    assert main(argv(tiny_model_dir, out)) == EXIT_DISK_FULL
    line = one_error(capsys.readouterr().err)
    assert str(out) in line and "the final output" in line and ".partial-final was removed" in line
    assert not list(out.glob(".partial-*")) and (out / "checkpoint-2").is_dir() and lock_is_free(out)
    monkeypatch.undo()
    finish_after_freeing_space(tiny_model_dir, out)


def test_checkpoint_estimate_covers_the_real_checkpoint(tiny_model_dir, tmp_path):
    """The estimate the first-save check uses is at least the size of a real checkpoint (LoRA, AdamW),
    and not wildly above it (a 1 MiB allowance for the small files)."""
    out = tmp_path / "run"
    seen = []
    real = space.checkpoint_bytes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(space, "checkpoint_bytes", lambda model: seen.append(real(model)) or seen[-1])
        assert main(argv(tiny_model_dir, out)) == 0
    written = sum(p.stat().st_size for p in (out / "checkpoint-1").rglob("*") if p.is_file())
    assert seen and written <= seen[0] <= written + 2 * space.SLACK, (written, seen[0])


def test_lock_on_a_full_disk_is_one_error_and_not_held(tmp_path, monkeypatch):
    """0 bytes free: the lock file is created but its pid cannot be written: DiskFullError, lock not held."""
    real_write = os.write

    def enospc(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", enospc)
    with pytest.raises(DiskFullError, match="cannot write its lock file"):
        lock_output_dir(tmp_path)
    monkeypatch.setattr(os, "write", real_write)
    assert lock_is_free(tmp_path)
    lock_output_dir(tmp_path)
    release_output_dir(tmp_path)


def test_is_disk_full(tmp_path, monkeypatch):
    assert space.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    writer = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(space, "free_bytes", lambda directory: 4096)
    assert space.is_disk_full(writer, tmp_path, 8192) and not space.is_disk_full(writer, tmp_path, 1024)
    assert not space.is_disk_full(writer)  # the zip writer's failure with no free-space evidence
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert space.is_disk_full(wrapped)
    assert not space.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not space.is_disk_full(RuntimeError("CUDA out of memory"))
