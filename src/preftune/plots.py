"""Plots of the logged metrics (``trainer_state.json`` → PNG, with matplotlib)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

DEFAULT_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                   "logps/chosen", "logps/rejected", "nll_loss", "kl")  # kl: KTO's KL estimate


def load_log_history(run_dir: str | Path) -> list[dict]:
    """``log_history`` of ``run_dir/trainer_state.json`` (or of the newest checkpoint in it).

    Raises ``FileNotFoundError`` when no trainer_state.json is found.
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / "trainer_state.json"]
    candidates += sorted(run_dir.glob("checkpoint-*/trainer_state.json"),
                         key=lambda p: int(p.parent.name.split("-")[-1]), reverse=True)
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())["log_history"]
    raise FileNotFoundError(f"no trainer_state.json in {run_dir} or its checkpoints")


def plot_metrics(run_dir: str | Path, metrics=DEFAULT_METRICS, out: str | Path | None = None,
                 history: list[dict] | None = None) -> Path:
    """One panel per metric: the train curve and, where logged, the eval points (``eval_<name>``).

    ``history``: a log history to draw instead of ``run_dir``'s ``trainer_state.json`` (a live
    trainer's, at a checkpoint). Returns the PNG path (default ``run_dir/metrics.png``), written
    atomically (a temporary file, then renamed). Metrics never logged are skipped; raises
    ``ValueError`` when none of them was logged.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = load_log_history(run_dir) if history is None else history
    present = [m for m in metrics if any(m in h or f"eval_{m}" in h for h in history)]
    if not present:
        from preftune.errors import ConfigError  # a user error: one line, exit 2 (issue 25)

        raise ConfigError(f"none of {', '.join(metrics)} was logged in {run_dir}")
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, present):
        for key, style, label in ((name, "-", "train"), (f"eval_{name}", "o--", "eval")):
            pts = [(h["step"], h[key]) for h in history if key in h]
            if pts:
                ax.plot(*zip(*pts), style, label=label, markersize=4)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)  # a reader (a browser, a crash) never sees half a PNG
    return out


def main(argv: list[str]) -> int:
    """``preftune plot RUN_DIR [--metrics m1 m2 ...] [--out file.png]``."""
    parser = argparse.ArgumentParser(prog="preftune plot", description="Plot metrics of a training run.")
    parser.add_argument("run_dir")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    print(plot_metrics(args.run_dir, args.metrics, args.out))
    return 0
