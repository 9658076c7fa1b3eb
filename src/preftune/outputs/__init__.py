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
* A full disk (:mod:`preftune.outputs.space`): room for one checkpoint (or the final output) is
  checked before the first step and before every save; ``ENOSPC`` while writing removes the
  partial directory and raises :class:`preftune.errors.DiskFullError` (exit status 4).
* Only the main process writes (``Trainer.args.should_save`` in the trainer; :func:`is_main_process`,
  from ``$RANK``, before the trainer exists).
"""

from __future__ import annotations

from preftune.outputs.files import (
    MARKER,
    atomic_write_text,
    checkpoint_dirs,
    is_main_process,
    latest_complete_checkpoint,
    resolve_checkpoint,
    verify_complete,
    write_marker,
)
from preftune.outputs.output_dir import (
    RESUME_KEYS,
    check_resume_config,
    describe_contents,
    lock_output_dir,
    prepare_output_dir,
    release_output_dir,
)
from preftune.outputs.saving import CrashSafeCheckpointMixin, save_final
from preftune.outputs.space import check_free_space, check_room_for_run, checkpoint_bytes

__all__ = ["MARKER", "RESUME_KEYS", "CrashSafeCheckpointMixin", "atomic_write_text", "check_free_space",
           "check_resume_config", "check_room_for_run", "checkpoint_bytes",
           "checkpoint_dirs", "describe_contents", "is_main_process", "latest_complete_checkpoint",
           "lock_output_dir", "prepare_output_dir", "release_output_dir", "resolve_checkpoint", "save_final",
           "verify_complete", "write_marker"]
