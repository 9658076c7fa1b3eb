"""The report page: :class:`~preftune.report.collect.RunData` of one run or several → HTML (figures
from :mod:`preftune.report.figures`, the jinja2 template of :mod:`preftune.report.template`)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from preftune.outputs.files import atomic_write_text
from preftune.plots import DEFAULT_METRICS
from preftune.report.collect import RunData, load_run
from preftune.report.figures import curve_figure, length_figure, margin_figure
from preftune.report.template import render

logger = logging.getLogger("preftune.report")
REPORT_FILE = "report.html"
_FIRST = ("loss", "rewards/accuracies", "rewards/margins", "accuracy", "margin")


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"


def _ordered_curves(runs: list[RunData]) -> list[str]:
    names: list[str] = []
    for run in runs:
        names += [n for n in run.curve_names() if n not in names]
    preferred = [n for n in (*_FIRST, *DEFAULT_METRICS) if n in names]
    return list(dict.fromkeys(preferred + names))


def _summary_rows(runs: list[RunData], curves: list[str]) -> list[dict[str, Any]]:
    """One row per metric: for each run, the last train value and the last eval value (``eval_<name>``)."""
    finals = [run.final_metrics() for run in runs]
    names = [n for n in curves if any(n in f or f"eval_{n}" in f for f in finals)]
    names += [k for k in ("train_loss", "train_runtime") if any(k in f for f in finals)]
    rows = [{"name": n, "cells": [c for f in finals for c in (_fmt(f.get(n)), _fmt(f.get(f"eval_{n}")))]}
            for n in names]
    steps = [max((h.get("step", 0) for h in run.history), default=0) for run in runs]
    rows.insert(0, {"name": "steps", "cells": [c for s in steps for c in (str(s), "")]})
    return rows


def _generation_table(run: RunData) -> Optional[dict[str, Any]]:
    rows = run.generations
    if not rows:
        return None
    columns = [c for c in ("base", "adapter", "model", "chosen", "rejected") if any(r.get(c) is not None for r in rows)]
    labels = {"adapter": "tuned", "model": "tuned (no adapter: base not kept)"}
    table = [{"prompt": r.get("prompt", ""), **{labels.get(c, c): r.get(c) or "" for c in columns}} for r in rows]
    return {"name": run.name, "columns": [labels.get(c, c) for c in columns], "rows": table}


def render_runs(runs: list[RunData], title: Optional[str] = None) -> str:
    """The HTML page for one run or several (compared: overlaid curves, one summary column per run).

    Raises ``ValueError`` for an empty ``runs``.
    """
    if not runs:
        raise ValueError("render_runs: no run given")
    curves = [c for c in ({"name": n, "uri": curve_figure(n, runs)} for n in _ordered_curves(runs)) if c["uri"]]
    margins = [{"name": r.name, "uri": u} for r in runs if (u := margin_figure(r.margins))]
    single = len(runs) == 1
    title = title or (f"preftune run: {runs[0].name}" if single else f"preftune: {len(runs)} runs compared")
    subtitle = ", ".join(str(r.run_dir) for r in runs)
    generations = [g for g in (_generation_table(r) for r in runs) if g]
    sections = [("summary", "Summary"), ("curves", "Curves"), ("margins", "Margins"), ("data", "Data")]
    if generations:
        sections.append(("generations", "Generations"))
    sections.append(("config", "Configuration"))
    return render(title=title, subtitle=subtitle, runs=runs, sections=sections,
                  summary_rows=_summary_rows(runs, [c["name"] for c in curves]), curves=curves, margins=margins,
                  data=[{"name": r.name, "text": r.data_report, "lengths_uri": length_figure(r.lengths)} for r in runs],
                  generations=generations, configs=[{"name": r.name, "text": r.config_yaml} for r in runs])


def write_report(run_dir: str | Path, *, history: Optional[list[dict]] = None, out: Optional[str | Path] = None,
                 plot: bool = True, title: Optional[str] = None) -> Path:
    """Write ``run_dir/report.html`` (or ``out``) from the run's files (``history``: a live trainer's
    log history, newer than the files), and ``metrics.png`` (:func:`preftune.plots.plot_metrics`) when
    ``plot`` and some default metric was logged. Returns the page's path.

    Raises ``FileNotFoundError`` when ``run_dir`` is not a run directory.
    """
    from preftune.plots import plot_metrics

    run = load_run(run_dir, history=history)
    target = Path(out) if out else Path(run_dir) / REPORT_FILE
    atomic_write_text(target, render_runs([run], title))
    os.chmod(target, 0o644)  # a page to open and share (atomic writes start as 0600)
    if plot and run.history:
        try:
            plot_metrics(run_dir, history=run.history)
        except ValueError:  # none of the default metrics logged yet
            pass
    return target


def write_comparison(run_dirs: list[str | Path], out: str | Path, title: Optional[str] = None) -> Path:
    """One page comparing ``run_dirs`` (e.g. CPO vs SFT, the two stages of an ALMA-R run) at ``out``.

    Runs sharing a directory name are told apart by their parent's name. Raises ``FileNotFoundError``
    for a directory that is not a run."""
    dirs = [Path(d) for d in run_dirs]
    names = [d.resolve().name for d in dirs]
    runs = [load_run(d, name=f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n)
            for d, n in zip(dirs, names)]
    target = Path(out)
    atomic_write_text(target, render_runs(runs, title))
    os.chmod(target, 0o644)
    return target
