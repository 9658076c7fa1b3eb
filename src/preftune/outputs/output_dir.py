"""``--output_dir`` before anything is loaded: writable, not another run's, locked, resume config matching."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from preftune.config import RunConfig
from preftune.errors import ConfigError, DiskFullError
from preftune.outputs.files import (
    _CHECKPOINT_RE,
    _IGNORED,
    _RUN_FILES,
    LATEST,
    LOCK_NAME,
    MARKER,
    PARTIAL_PREFIX,
    is_main_process,
    latest_complete_checkpoint,
    resolve_checkpoint,
)
from preftune.outputs.space import check_min_free

logger = logging.getLogger("preftune.outputs")

# What must match between a checkpoint and the run resuming it: the loss and its hyper-parameters,
# the model, the data and its tokenisation, the engine layout, and what orders the batches.
RESUME_KEYS = {
    "ModelArguments": ("model_name_or_path", "dtype"),
    "PeftArguments": ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "peft_model_id",
                      "load_in_4bit"),
    "DataArguments": None,  # every field
    "LossArguments": None,
    "EngineArguments": ("share_prompt", "padding_free", "max_tokens_per_batch", "precompute_ref_log_probs"),
    "training": ("seed", "per_device_train_batch_size", "gradient_accumulation_steps"),
}


# ---- the output directory ------------------------------------------------------------------------
def _entries(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name not in _IGNORED)


def describe_contents(out: Path) -> tuple[bool, str]:
    """``(holds_a_run, description)`` of a non-empty directory, e.g.
    ``(True, "a cpo run (preftune_config.yaml, 3 checkpoints)")``."""
    import yaml

    entries = _entries(out)
    ckpts = [p for p in entries if _CHECKPOINT_RE.match(p.name)]
    partial = [p for p in entries if p.name.startswith(PARTIAL_PREFIX)]
    run_files = [p.name for p in entries if p.name in _RUN_FILES]
    if not (ckpts or partial or run_files):
        shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:4])
        return False, f"{len(entries)} entries that are not a preftune run ({shown}{', …' if len(entries) > 4 else ''})"
    loss = None
    for cfg in [out / "preftune_config.yaml"] + [c / "preftune_config.yaml" for c in ckpts]:
        with contextlib.suppress(Exception):
            loss = (yaml.safe_load(cfg.read_text()) or {}).get("loss")
            if loss:
                break
    parts = [", ".join(n for n in ("preftune_config.yaml", "adapter_model.safetensors", "model.safetensors")
                       if n in run_files)]
    if ckpts:
        parts.append(f"{len(ckpts)} checkpoint{'s' if len(ckpts) > 1 else ''}")
    if partial:
        parts.append(f"{len(partial)} partial write{'s' if len(partial) > 1 else ''}")
    other = len(entries) - len(ckpts) - len(partial) - len(run_files)
    if other:
        parts.append(f"{other} other entr{'ies' if other > 1 else 'y'}")
    detail = ", ".join(p for p in parts if p)
    return True, f"a {loss + ' ' if loss else ''}run ({detail})"


_LOCKS: dict[str, int] = {}


def lock_output_dir(out: str | os.PathLike) -> None:
    """Hold an exclusive ``fcntl`` lock on ``<out>/.preftune.lock`` until :func:`release_output_dir`
    (or the end of the process: the OS releases it even on SIGKILL). Raises :class:`ConfigError`
    when another process holds it; a no-op when this process holds it already."""
    path = Path(out).resolve() / LOCK_NAME
    if str(path) in _LOCKS:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip()
        os.close(fd)
        raise ConfigError(f"--output_dir {out}: another preftune run is using it"
                          + (f" (pid {holder})" if holder else "") + "; wait for it or choose another --output_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError as exc:  # a full disk: the lock file exists, its pid cannot be written
        os.close(fd)
        raise DiskFullError(exc.errno, f"--output_dir {out}: cannot write its lock file {LOCK_NAME} "
                            f"({exc.strerror}); free some space or choose another --output_dir") from None
    _LOCKS[str(path)] = fd


def release_output_dir(out: str | os.PathLike) -> None:
    """Release this process's lock on ``out`` (see :func:`lock_output_dir`); a no-op when not held."""
    fd = _LOCKS.pop(str(Path(out).resolve() / LOCK_NAME), None)
    if fd is not None:
        os.close(fd)


def _probe_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not out.is_dir():
            raise NotADirectoryError(f"{out} is not a directory")
        fd, probe = tempfile.mkstemp(prefix=".preftune-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(exc.errno, f"--output_dir {out}: no space left on the device; free some space or "
                                "choose another --output_dir") from None
        reason = exc.strerror or str(exc)
        raise ConfigError(f"--output_dir {out} is not writable ({reason}); choose a directory you can write to") from None
    check_min_free(out)  # an empty probe file fits even on a full disk


def _resume_values(config: dict[str, Any], groups: RunConfig) -> dict[str, Any]:
    """The :data:`RESUME_KEYS` values of a resolved-config mapping (missing training keys → defaults)."""
    from preftune.cli_args import PreftuneTrainingArguments

    values: dict[str, Any] = {}
    for g in groups:
        name = type(g).__name__
        if name in RESUME_KEYS:
            keys = RESUME_KEYS[name] or tuple(f.name for f in dataclasses.fields(g) if f.init and not f.name.startswith("_"))
            values.update({k: config[k] for k in keys if k in config})
    defaults = PreftuneTrainingArguments.__dataclass_fields__
    for k in RESUME_KEYS["training"]:
        values[k] = config.get(k, defaults[k].default)
    return values


def check_resume_config(checkpoint: str, groups: RunConfig) -> None:
    """Raise :class:`ConfigError` naming the keys of :data:`RESUME_KEYS` whose values differ between
    ``checkpoint``'s ``preftune_config.yaml`` and the current ``groups``."""
    import yaml

    from preftune.cli_args import config_to_yaml

    saved_path = Path(checkpoint) / "preftune_config.yaml"
    if not saved_path.is_file():
        logger.warning("%s has no preftune_config.yaml: its configuration cannot be compared with this run's",
                       checkpoint)
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = yaml.safe_load(config_to_yaml(groups))
    a, b = _resume_values(saved, groups), _resume_values(current, groups)
    diff = [f"{k}: {a[k]!r} → {b[k]!r}" for k in b if k in a and a[k] != b[k]]
    if diff:
        raise ConfigError(f"--resume_from_checkpoint {checkpoint}: it was trained with another configuration "
                          f"({'; '.join(diff)}); resume with the same settings, or start a new run in another "
                          "--output_dir (or with --overwrite_output_dir)")


def prepare_output_dir(groups: RunConfig) -> Optional[str]:
    """Check (and, with ``--overwrite_output_dir``, clear) ``--output_dir`` before anything is
    loaded; returns the checkpoint to resume from (None for a fresh run).

    Raises :class:`ConfigError`: the directory is not writable; it is not empty and holds another
    run (the message says what) with neither ``--overwrite_output_dir`` nor
    ``--resume_from_checkpoint``; it holds files that are not a run and ``--overwrite_output_dir``
    would delete them; the resumed checkpoint's configuration differs (keys named); another run
    holds the directory's lock. ``FileNotFoundError``: no checkpoint to resume.
    """
    args = groups.training
    out = Path(args.output_dir)
    _probe_writable(out)
    if not is_main_process():
        return resolve_checkpoint(args.resume_from_checkpoint, str(out))
    held = str(out.resolve() / LOCK_NAME) in _LOCKS
    lock_output_dir(out)  # released by train.run at the end, or here when the directory is refused
    try:
        return _check_output_dir(out, args, groups)
    except BaseException:
        if not held:
            release_output_dir(out)
        raise


def _restart(out: Path, groups: RunConfig, door: str = "--resume_from_checkpoint latest") -> None:
    """``--resume_from_checkpoint latest`` on a run killed before its first complete checkpoint (during
    the data or reference work, a first step or the first save): the run's resolved config, where one
    was written (the output directory, or a partial or incomplete checkpoint), must match this one
    (:func:`check_resume_config`); then its partial writes and
    incomplete checkpoints are removed and training starts from step 0. A plain restart (``door``) of
    the same run takes this path too when :func:`_killed_before_first_checkpoint`.

    Raises :class:`ConfigError`: the directory holds another run's configuration or files that are
    not a run."""
    is_run, what = describe_contents(out)
    if not is_run:
        raise ConfigError(f"--output_dir {out} holds {what}: nothing to resume; choose an empty or new --output_dir")
    config = _written_config(out)
    if config is not None:
        check_resume_config(str(config.parent), groups)
    for p in _entries(out):
        if p.name.startswith(PARTIAL_PREFIX) or (_CHECKPOINT_RE.match(p.name) and p.is_dir()):
            shutil.rmtree(p, ignore_errors=True)  # incomplete (no complete checkpoint exists)
    logger.info("%s: %s held no complete checkpoint (%s); starting from step 0", door, out, what)
    return None


def _written_config(out: Path) -> Optional[Path]:
    """The killed run's resolved config, where written: the output directory, a checkpoint or a partial write."""
    written = [out / "preftune_config.yaml", *sorted(out.glob("checkpoint-*/preftune_config.yaml")),
               *sorted(out.glob(f"{PARTIAL_PREFIX}*/**/preftune_config.yaml"))]
    return next((p for p in written if p.is_file()), None)


def _killed_before_first_checkpoint(out: Path) -> bool:
    """``out`` holds a run's partial writes only: a ``.partial-*`` entry and its resolved config (to compare
    with), no complete checkpoint, no final output (a run killed during its first save)."""
    partial = any(p.name.startswith(PARTIAL_PREFIX) for p in _entries(out))
    return (partial and _written_config(out) is not None and not (out / MARKER).exists()
            and latest_complete_checkpoint(out, warn=False) is None)


def _check_output_dir(out: Path, args, groups: RunConfig) -> Optional[str]:
    resume = resolve_checkpoint(args.resume_from_checkpoint, str(out))
    if resume:
        check_resume_config(resume, groups)
        return resume
    if not _entries(out):
        return None
    if args.resume_from_checkpoint in LATEST:  # killed before its first complete checkpoint: start again
        return _restart(out, groups)
    if not getattr(args, "overwrite_output_dir", False) and _killed_before_first_checkpoint(out):
        with contextlib.suppress(ConfigError):  # the same run (its config where written): a plain restart too
            return _restart(out, groups, "a restart of the same run")
    is_run, what = describe_contents(out)
    if not getattr(args, "overwrite_output_dir", False):
        raise ConfigError(f"--output_dir {out} is not empty: it holds {what}; use --overwrite_output_dir to replace it, "
                          "--resume_from_checkpoint latest to continue it, or another --output_dir")
    if not is_run:
        raise ConfigError(f"--output_dir {out} holds {what}; --overwrite_output_dir only clears a directory that "
                          "holds a run: choose an empty or new --output_dir")
    for p in _entries(out):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    logger.info("--overwrite_output_dir: cleared %s (it held %s)", out, what)
    return None
