"""A full disk: checked before the first save and handled at every write (:mod:`preftune.outputs`).

* :func:`check_room_for_run` (once the trainer exists, before the first step): free space in
  ``--output_dir`` against the expected checkpoint size (:func:`checkpoint_bytes`) when the run
  saves checkpoints, else against the final output (:func:`output_bytes`).
* :func:`guard_checkpoint` / :func:`guard_final` (decorators of the checkpoint and final writers):
  the same check before each save, and any ``ENOSPC`` while writing (also torch's
  ``RuntimeError`` from its zip writer, which hides the ``errno``) becomes one
  :class:`~preftune.errors.DiskFullError` naming the directory, the bytes needed and the bytes free,
  after the partial directory is removed. The CLI exits with
  :data:`~preftune.errors.EXIT_DISK_FULL` (4); the lock goes with the process.
"""

from __future__ import annotations

import errno
import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from preftune.errors import DiskFullError

PARTIAL = ".partial-"  # preftune.outputs.files.PARTIAL_PREFIX (not imported: files.py imports nothing from here)
SLACK = 1 << 20  # configs, trainer state, RNG state, tokenizer files: 1 MiB on top of the tensors
MIN_FREE = 1 << 20  # what a run needs before anything is loaded (the lock, the resolved config, logs)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover


def free_bytes(directory: str | Path) -> int:
    """Free bytes for an unprivileged writer on ``directory``'s file system (its nearest existing parent)."""
    path = Path(directory).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def output_bytes(model) -> int:
    """Bytes of the weights a save writes: the trainable parameters for a PEFT (LoRA) model, every
    parameter and buffer otherwise (each at its own dtype), plus :data:`SLACK`."""
    if hasattr(model, "peft_config"):
        tensors = [p for p in model.parameters() if p.requires_grad]
    else:
        tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) + SLACK


def checkpoint_bytes(model) -> int:
    """Expected size of one checkpoint: :func:`output_bytes` plus two float32 optimiser states per
    trainable parameter (AdamW's first and second moments: the default optimiser, the largest usual one)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return output_bytes(model) + 2 * 4 * trainable


def check_free_space(directory: str | Path, needed: int, what: str) -> None:
    """Raise :class:`DiskFullError` when ``directory`` has fewer than ``needed`` free bytes; the one
    line names the directory, ``what`` is written, the bytes needed and free."""
    free = free_bytes(directory)
    if free < needed:
        raise DiskFullError(errno.ENOSPC, f"{directory}: not enough free space for {what}: needs about {needed} bytes "
                            f"({_size(needed)}), {free} free ({_size(free)}); free some space or choose another "
                            "--output_dir")


def check_room_for_run(trainer) -> None:
    """Before the first step: room in ``--output_dir`` for one checkpoint (when the run saves any) or
    for the final output. Raises :class:`DiskFullError`."""
    args = trainer.args
    if not args.should_save:
        return
    saves = str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
    needed = checkpoint_bytes(trainer.model) if saves else output_bytes(trainer.model)
    check_free_space(args.output_dir, needed, "a checkpoint" if saves else "the final output")


def is_disk_full(exc: BaseException, directory: Optional[str | Path] = None, needed: int = 0) -> bool:
    """``ENOSPC`` (or ``EDQUOT``, a quota) in ``exc`` or its causes. torch's zip writer raises a bare
    ``RuntimeError`` ("... file write failed", "[enforce fail at inline_container.cc] ... unexpected
    pos"): counted only when ``directory`` is given and has fewer than ``needed`` bytes free now."""
    seen = exc
    while seen is not None:
        if isinstance(seen, DiskFullError) or getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    writer = isinstance(exc, RuntimeError) and any(s in text for s in ("write failed", "unexpected pos",
                                                                      "inline_container"))
    return writer and directory is not None and free_bytes(directory) < needed


def _written_failed(exc: BaseException, directory: Path, partial: Path, needed: int, what: str) -> DiskFullError:
    shutil.rmtree(partial, ignore_errors=True)
    free = free_bytes(directory)
    return DiskFullError(errno.ENOSPC, f"{directory}: no space left on the device while writing {what} (needs about "
                         f"{needed} bytes ({_size(needed)}), {free} free ({_size(free)}); the partial write "
                         f"{partial.name} was removed); free some space, then rerun with --resume_from_checkpoint latest")


def _guarded(method: Callable, out_of: Callable, partial_name: Callable, needed_of: Callable,
             what_of: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        trainer = out_of(*args)
        directory = Path(trainer.args.output_dir)
        what, needed = what_of(*args), needed_of(*args)
        if trainer.args.should_save:
            check_free_space(directory, needed, what)
        try:
            return method(*args, **kwargs)
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, DiskFullError) or not trainer.args.should_save or not is_disk_full(exc, directory, needed):
                raise
            raise _written_failed(exc, directory, directory / partial_name(*args), needed, what) from None
    return wrapper


def guard_checkpoint(method: Callable) -> Callable:
    """Decorator of ``Trainer._save_checkpoint(self, model, trial)``: room for ``checkpoint-N``
    checked first (:func:`checkpoint_bytes`); a full disk while writing removes
    ``.partial-checkpoint-N`` and raises :class:`DiskFullError`."""
    return _guarded(method, lambda self, *a: self,
                    lambda self, *a: f"{PARTIAL}checkpoint-{self.state.global_step}",
                    lambda self, *a: checkpoint_bytes(self.model),
                    lambda self, *a: f"checkpoint-{self.state.global_step}")


def guard_final(function: Callable) -> Callable:
    """Decorator of :func:`preftune.outputs.save_final` ``(trainer, model, ...)``: room for the final
    output checked first (:func:`output_bytes`); a full disk while writing removes ``.partial-final``
    and raises :class:`DiskFullError`."""
    return _guarded(function, lambda trainer, *a: trainer, lambda *a: f"{PARTIAL}final",
                    lambda trainer, model, *a: output_bytes(model), lambda *a: "the final output")


def check_min_free(directory: str | Path, needed: Optional[int] = None) -> None:
    """Before anything is loaded: at least :data:`MIN_FREE` bytes free in ``directory`` (an empty probe
    file is created even on a full disk). Raises :class:`DiskFullError`."""
    check_free_space(directory, MIN_FREE if needed is None else needed, "a run (its lock, config and logs)")
