"""What a run's report shows, gathered from a live trainer or read back from a run directory.

:func:`pair_lengths` and :func:`eval_margins` work on in-memory pairs (called by
:mod:`preftune.train` before and after training); :func:`save_extras` stores them as
``report_data.json`` next to the run's other files; :func:`load_run` reads a run directory
(``preftune_config.yaml``, ``data_report.txt``, ``trainer_state.json``, ``report_data.json``) into a
:class:`RunData` that the page is drawn from.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger("preftune.report")

EXTRAS_FILE = "report_data.json"
# keys of a log entry that are bookkeeping, not a curve
_NOT_CURVES = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second",
               "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_num_pairs"}


@dataclass
class RunData:
    """One run as the report sees it; every field may be empty (a run still in progress, an old run)."""

    name: str
    run_dir: Path
    config_yaml: str = ""
    data_report: str = ""
    history: list[dict] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def lengths(self) -> dict[str, list[int]]:
        """``{"prompt": [...], "chosen": [...], "rejected": [...]}`` token counts of the train pairs."""
        return self.extras.get("lengths") or {}

    @property
    def margins(self) -> dict[str, list[float]]:
        """``{"before": [...], "after": [...]}`` reward margins of the eval pairs (either may be missing)."""
        return self.extras.get("eval_margins") or {}

    @property
    def generations(self) -> list[dict]:
        """Rows of :func:`preftune.generate.generate_from_pairs` (``prompt``, ``base``, ``adapter`` ...)."""
        return self.extras.get("generations") or []

    def curve_names(self) -> list[str]:
        """Every numeric metric logged during training (train name; ``eval_x`` is drawn with ``x``),
        in first-logged order, bookkeeping keys (step, epoch, runtimes) left out."""
        names: list[str] = []
        for entry in self.history:
            for key, value in entry.items():
                if key in _NOT_CURVES or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                name = key[5:] if key.startswith("eval_") else key
                if name not in names and name not in _NOT_CURVES:
                    names.append(name)
        return [n for n in names if n not in ("train_loss",)]

    def points(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of ``key`` in the log history, non-finite values left out."""
        return [(h["step"], float(h[key])) for h in self.history
                if key in h and isinstance(h[key], (int, float)) and math.isfinite(h[key]) and "step" in h]

    def final_metrics(self) -> dict[str, float]:
        """The last logged value of every curve (train and eval), for the summary table."""
        out: dict[str, float] = {}
        for entry in self.history:
            for key, value in entry.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[key] = float(value)
        return out


def pair_lengths(pairs) -> dict[str, list[int]]:
    """Token counts of prompt, chosen and rejected of each :class:`preftune.types.TokenizedPair`
    (after truncation: what the model is trained on)."""
    return {"prompt": [len(p.prompt_ids) for p in pairs], "chosen": [len(p.chosen_ids) for p in pairs],
            "rejected": [len(p.rejected_ids) for p in pairs]}


def eval_margins(model, pairs, loss_args, engine_args, *, pad_token_id: int = 0, batch_size: int = 8,
                 desc: str = "eval margins") -> list[float]:
    """Per-pair reward margin (chosen reward − rejected reward, the loss's own rewards, e.g. DPO's
    ``β·(log π/π_ref)``) of ``pairs`` under ``model``, in order, without gradients, with a progress bar.

    ``(N,)`` floats; pairs need ``ref_*`` filled for losses with a reference (the DPO family).
    KTO's unpaired examples and reward models give their own rewards' differences the same way.
    """
    from preftune.engine.reference import progress_disabled
    from preftune.losses import compute_loss
    from preftune.score import scored_batches

    was_training = model.training
    model.eval()
    margins: list[float] = []
    try:
        for _chunk, scores in scored_batches(model, pairs, engine_args, batch_size=batch_size,
                                             pad_token_id=pad_token_id, progress=None if progress_disabled() else desc):
            out = compute_loss(scores, loss_args)
            margins.extend((out.chosen_rewards - out.rejected_rewards).float().cpu().tolist())
    finally:
        model.train(was_training)
    return margins


def save_extras(run_dir: str | Path, extras: dict[str, Any]) -> Path:
    """Write ``extras`` (lengths, margins, generations) to ``run_dir/report_data.json`` atomically."""
    from preftune.outputs.files import atomic_write_text

    path = Path(run_dir) / EXTRAS_FILE
    atomic_write_text(path, json.dumps(extras, ensure_ascii=False))
    return path


def _newest_checkpoint(run_dir: Path) -> Optional[Path]:
    ckpts = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def load_run(run_dir: str | Path, *, history: Optional[list[dict]] = None, name: Optional[str] = None) -> RunData:
    """A run directory as :class:`RunData`: the root's files, else the newest checkpoint's.

    ``history`` (a live trainer's ``state.log_history``) wins over the files. Raises
    ``FileNotFoundError`` when ``run_dir`` is not a directory or holds no trainer state, resolved
    configuration nor report data at all.
    """
    from preftune.plots import load_log_history

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found")
    ckpt = _newest_checkpoint(run_dir)
    config = _read(run_dir / "preftune_config.yaml") or (_read(ckpt / "preftune_config.yaml") if ckpt else "")
    if history is None:
        try:
            history = load_log_history(run_dir)
        except (FileNotFoundError, ValueError, KeyError):
            history = []
    extras: dict[str, Any] = {}
    if (run_dir / EXTRAS_FILE).is_file():
        try:
            extras = json.loads((run_dir / EXTRAS_FILE).read_text())
        except ValueError:
            logger.warning("ignoring unreadable %s", run_dir / EXTRAS_FILE)
    if not (history or config or extras):
        raise FileNotFoundError(f"{run_dir}: no trainer_state.json, preftune_config.yaml nor {EXTRAS_FILE}; "
                                "not a preftune run directory")
    data_report = _read(run_dir / "data_report.txt") or extras.get("data_report", "")
    return RunData(name or run_dir.resolve().name, run_dir, config, data_report.strip(), history, extras)
