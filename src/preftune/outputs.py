"""Output directories that never mix runs, and writes that a crash cannot leave half-done.

* :func:`prepare_output_dir` (before the model is loaded): ``--output_dir`` must be writable; a
  non-empty one holding another run is a :class:`ConfigError` that says what is there, unless
  ``--overwrite_output_dir`` (cleared, but only when it holds a run) or
  ``--resume_from_checkpoint`` (the checkpoint's resolved config must match the current one in
  what decides the trajectory: :data:`RESUME_KEYS`). A run holds an ``fcntl`` lock on
  ``<output_dir>/.preftune.lock`` while it lives, so a second concurrent run on the same
  directory refuses too.
* Completeness: a checkpoint or the final output is complete when its marker
  (:data:`MARKER`, written last) lists every file with its size (and CRC-32 for files up to
  :data:`CRC_LIMIT` bytes) and the files match. :func:`latest_complete_checkpoint` (behind
  ``--resume_from_checkpoint latest``) skips, with a warning, every ``checkpoint-*`` that fails
  the check (a partial or corrupted write) and takes the newest one that passes.
* :class:`CrashSafeCheckpointMixin`: a checkpoint is written into ``.partial-checkpoint-N/``,
  gets the resolved config and the marker, and is renamed to ``checkpoint-N`` (one atomic
  ``rename`` on a POSIX file system). :func:`save_final` does the same for the final files
  (staged in ``.partial-final/``, moved one by one with ``os.replace``, marker last).
* Only the main process writes (``Trainer.args.should_save`` in the trainer; :func:`is_main_process`,
  from ``$RANK``, before the trainer exists).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Optional

from preftune.config import ConfigError

logger = logging.getLogger("preftune.outputs")

MARKER = "preftune_complete.json"
LOCK_NAME = ".preftune.lock"
PARTIAL_PREFIX = ".partial-"
CRC_LIMIT = 64 << 20  # files up to 64 MiB get a CRC-32 in the marker (adapters, optimiser of LoRA, states)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_IGNORED = {LOCK_NAME, ".gitkeep", ".gitignore", ".DS_Store"}
# files that make a directory "a run" (safe to clear with --overwrite_output_dir)
_RUN_FILES = {"preftune_config.yaml", "trainer_state.json", "train_results.json", "all_results.json",
              "adapter_config.json", "adapter_model.safetensors", "model.safetensors", "data_report.txt", MARKER}

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


def is_main_process() -> bool:
    """True on the process that writes (rank 0 under ``torchrun`` / ``accelerate launch``)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


# ---- atomic files --------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_table(directory: Path) -> dict[str, list]:
    table = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MARKER:
            size = p.stat().st_size
            table[p.relative_to(directory).as_posix()] = [size, _crc32(p) if size <= CRC_LIMIT else None]
    return table


def write_marker(directory: str | os.PathLike, kind: str, **info: Any) -> None:
    """Write the completeness marker of ``directory`` (every file, its size and CRC-32), last."""
    directory = Path(directory)
    for p in directory.rglob("*"):  # the files' data reach the disk before the marker does
        if p.is_file():
            with contextlib.suppress(OSError), open(p, "rb") as fh:
                os.fsync(fh.fileno())
    marker = {"kind": kind, "time": time.time(), **info, "files": _file_table(directory)}
    atomic_write_text(directory / MARKER, json.dumps(marker, indent=1))


def verify_complete(directory: str | os.PathLike) -> Optional[str]:
    """None when ``directory`` holds a marker and every file it lists, unchanged; else the reason."""
    directory = Path(directory)
    try:
        marker = json.loads((directory / MARKER).read_text())
        files = marker["files"]
    except FileNotFoundError:
        return f"no {MARKER} (a partial write, or written by another tool)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MARKER} ({exc})"
    for name, (size, crc) in files.items():
        p = directory / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, {size} were written"
        if crc is not None and _crc32(p) != crc:
            return f"{name} is corrupted (CRC-32 differs from the one written)"
    return None


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the complete directory ``src`` to ``dst`` (replacing an older ``dst``)."""
    old = None
    if dst.exists():
        old = dst.with_name(f"{PARTIAL_PREFIX}old-{dst.name}-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- checkpoints ---------------------------------------------------------------------------------
def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` directories of ``output_dir``, newest (largest N) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, key=lambda x: -x[0])]


def latest_complete_checkpoint(output_dir: str | os.PathLike, warn: bool = True) -> Optional[str]:
    """The newest ``checkpoint-N`` of ``output_dir`` that passes :func:`verify_complete`; each newer
    one that does not is skipped (with a warning when ``warn``). None when there is none."""
    for ckpt in checkpoint_dirs(output_dir):
        reason = verify_complete(ckpt)
        if reason is None:
            return str(ckpt)
        if warn:
            logger.warning("skipping %s: incomplete or corrupted checkpoint (%s); never loaded", ckpt, reason)
    return None


def resolve_checkpoint(value: Optional[str], output_dir: str) -> Optional[str]:
    """``latest`` → :func:`latest_complete_checkpoint`; a path → itself (verified when it has a
    marker); None / ``false`` → None.

    Raises ``FileNotFoundError`` when ``latest`` finds no complete checkpoint or the path is
    missing, :class:`ConfigError` when the path's marker shows an incomplete or corrupted write.
    """
    if value in (None, "", "false", "False", "no"):
        return None
    if value in ("latest", "true", "True"):
        last = latest_complete_checkpoint(output_dir)
        if last is None:
            found = len(checkpoint_dirs(output_dir))
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint-* directory in "
                                    f"{output_dir}" + (f" ({found} incomplete or corrupted)" if found else ""))
        return last
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint directory")
    if (path / MARKER).exists():
        reason = verify_complete(path)
        if reason:
            raise ConfigError(f"--resume_from_checkpoint {value}: incomplete or corrupted checkpoint ({reason})")
    else:
        logger.warning("%s has no %s (written by another tool or an older preftune): loading it unchecked",
                       path, MARKER)
    return value


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
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
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
        reason = exc.strerror or str(exc)
        raise ConfigError(f"--output_dir {out} is not writable ({reason}); choose a directory you can write to") from None


def _training_args(groups: tuple):
    from transformers import TrainingArguments

    return next(g for g in groups if isinstance(g, TrainingArguments))


def _resume_values(config: dict[str, Any], groups: tuple) -> dict[str, Any]:
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


def check_resume_config(checkpoint: str, groups: tuple) -> None:
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


def prepare_output_dir(groups: tuple) -> Optional[str]:
    """Check (and, with ``--overwrite_output_dir``, clear) ``--output_dir`` before anything is
    loaded; returns the checkpoint to resume from (None for a fresh run).

    Raises :class:`ConfigError`: the directory is not writable; it is not empty and holds another
    run (the message says what) with neither ``--overwrite_output_dir`` nor
    ``--resume_from_checkpoint``; it holds files that are not a run and ``--overwrite_output_dir``
    would delete them; the resumed checkpoint's configuration differs (keys named); another run
    holds the directory's lock. ``FileNotFoundError``: no checkpoint to resume.
    """
    args = _training_args(groups)
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


def _check_output_dir(out: Path, args, groups: tuple) -> Optional[str]:
    resume = resolve_checkpoint(args.resume_from_checkpoint, str(out))
    if resume:
        check_resume_config(resume, groups)
        return resume
    if not _entries(out):
        return None
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


# ---- crash-safe writes ---------------------------------------------------------------------------
class CrashSafeCheckpointMixin:
    """``Trainer._save_checkpoint`` through a temporary directory (mixed into the preference trainer).

    The Trainer writes ``checkpoint-N`` under the run directory it gets from ``_get_output_dir``;
    during a save that is ``.partial-checkpoint-N/``, then the resolved config
    (``run_config_yaml``) and the marker are added and the directory is renamed into place.
    The trainable weights are checked (:meth:`guard.check_weights`) first: a non-finite model is
    never checkpointed. Only ``args.should_save`` processes write; the others wait.
    """

    run_config_yaml: Optional[str] = None
    _staging_root: Optional[str] = None

    def _get_output_dir(self, trial) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _run_epoch(self, *args, **kwargs):
        # transformers 5 resumed from a checkpoint at max_steps (a run killed during its final save)
        # trains one more step (the stop test follows each step); nothing is left to train
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        from preftune.guard import fault_point

        name = f"checkpoint-{self.state.global_step}"
        self.guard.check_weights(self.model, f"saving {name}")
        run_dir = Path(super()._get_output_dir(trial))
        staging = run_dir / f"{PARTIAL_PREFIX}{name}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            written, final = staging / name, run_dir / name
            best = self.state.best_model_checkpoint
            if best and Path(best) == written:
                self.state.best_model_checkpoint = str(final)
                self.state.save_to_json(str(written / "trainer_state.json"))
            if self.run_config_yaml:
                atomic_write_text(written / "preftune_config.yaml", self.run_config_yaml)
            write_marker(written, "checkpoint", step=self.state.global_step)
            fault_point("checkpoint_write")
            _replace_dir(written, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()


def _write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=4, sort_keys=True))


def save_final(trainer, model, tokenizer, metrics: dict[str, float], files: dict[str, str]) -> Path:
    """The final save, crash-safe: adapter (or model) + tokenizer, ``train_results.json`` (all
    ``metrics``), ``eval_results.json`` (the ``eval_*`` ones), ``all_results.json``,
    ``trainer_state.json`` and the text ``files`` (name → content) are written into
    ``<output_dir>/.partial-final/``, then moved into ``output_dir`` one by one (``os.replace``),
    the marker last; a crash leaves the older marker removed, so an incomplete final output is
    recognisable. The weights are checked first (:class:`preftune.guard.NonFiniteError`).
    Returns ``output_dir``.
    """
    from preftune.guard import fault_point
    from preftune.peft_utils import save_adapter

    out = Path(trainer.args.output_dir)
    trainer.guard.check_weights(model, "the final save")
    staging = out / f"{PARTIAL_PREFIX}final"
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()
    if hasattr(model, "peft_config"):
        if main:
            save_adapter(model, staging)
            tokenizer.save_pretrained(staging)
    else:
        trainer.save_model(str(staging))  # every rank (gathers sharded weights), the main one writes
    if main:
        _write_json(staging / "train_results.json", metrics)
        evals = {k: v for k, v in metrics.items() if k.startswith("eval_")}
        if evals:
            _write_json(staging / "eval_results.json", evals)
        _write_json(staging / "all_results.json", metrics)
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        for name, text in files.items():
            (staging / name).write_text(text)
        write_marker(staging, "final", step=trainer.state.global_step)
        fault_point("final_save")
        (out / MARKER).unlink(missing_ok=True)
        for p in sorted(staging.iterdir(), key=lambda p: p.name == MARKER):  # the marker last
            target = out / p.name
            if p.is_dir():
                _replace_dir(p, target)
            else:
                os.replace(p, target)
        _fsync_dir(out)
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return out
