"""Checkpoints and the final save through a staging directory, the marker last (:mod:`preftune.outputs`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from preftune.outputs.files import (
    MARKER,
    PARTIAL_PREFIX,
    _fsync_dir,
    _replace_dir,
    atomic_write_text,
    write_marker,
)
from preftune.outputs.space import guard_checkpoint, guard_final

logger = logging.getLogger("preftune.outputs")


# ---- crash-safe writes ---------------------------------------------------------------------------
class CrashSafeCheckpointMixin:
    """``Trainer._save_checkpoint`` through a temporary directory (mixed into the preference trainer).

    The Trainer writes ``checkpoint-N`` under the run directory it gets from ``_get_output_dir``;
    during a save that is ``.partial-checkpoint-N/``, then the resolved config
    (``run_config_yaml``) and the marker are added and the directory is renamed into place.
    The trainable weights are checked (:meth:`guard.check_weights`) first: a non-finite model is
    never checkpointed. Only ``args.should_save`` processes write; the others wait.
    ``after_save`` (set by :mod:`preftune.train`: ``report.html`` and ``metrics.png``) is called with
    the complete checkpoint's path on the saving process; its errors are logged, never raised (a page
    that cannot be drawn does not stop a run).
    """

    run_config_yaml: Optional[str] = None
    after_save: Optional[Callable[[Path], None]] = None
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

    @guard_checkpoint  # room checked first; a full disk: one DiskFullError, the partial directory removed
    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        from preftune.faults import fault_point

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
            if self.after_save is not None:
                try:
                    self.after_save(final)
                except Exception as exc:  # the report is a view of the run, not part of it
                    logger.warning("after saving %s: %s: %s", name, type(exc).__name__, exc)
        self.accelerator.wait_for_everyone()


def _write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=4, sort_keys=True))


@guard_final  # room checked first; a full disk: one DiskFullError, the partial directory removed
def save_final(trainer, model, tokenizer, metrics: dict[str, float], files: dict[str, str]) -> Path:
    """The final save, crash-safe: adapter (or model) + tokenizer, ``train_results.json`` (all
    ``metrics``), ``eval_results.json`` (the ``eval_*`` ones), ``all_results.json``,
    ``trainer_state.json`` and the text ``files`` (name → content) are written into
    ``<output_dir>/.partial-final/``, then moved into ``output_dir`` one by one (``os.replace``),
    the marker last; a crash leaves the older marker removed, so an incomplete final output is
    recognisable. The weights are checked first (:class:`preftune.guard.NonFiniteError`).
    Returns ``output_dir``.
    """
    from preftune.faults import fault_point
    from preftune.models.peft import save_adapter

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
