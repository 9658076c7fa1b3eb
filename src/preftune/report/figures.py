"""The report's figures, drawn with matplotlib and embedded as ``data:image/png;base64`` URIs, so
the page is one file that needs no network."""

from __future__ import annotations

import base64
import io
import math
from typing import Optional

_DPI = 80
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_data_uri(fig) -> str:
    """``fig`` as a base64 PNG data URI (closed afterwards)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def curve_figure(name: str, runs: list) -> Optional[str]:
    """One metric over steps: each run's train curve (line) and eval points (``eval_<name>``, dashed
    with markers). ``runs``: :class:`preftune.report.collect.RunData`. None when nothing was logged."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 2.9))
    drawn = 0
    for i, run in enumerate(runs):
        color = _COLORS[i % len(_COLORS)]
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        for key, style, label in ((name, "-", "train"), (f"eval_{name}", "o--", "eval")):
            pts = run.points(key)
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=prefix + label, markersize=3.5,
                        alpha=0.9 if style == "-" else 1.0, linewidth=1.4)
                drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(name, fontsize=11)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return to_data_uri(fig)


def length_figure(lengths: dict[str, list[int]]) -> Optional[str]:
    """Histograms of prompt / chosen / rejected token counts (one panel each). None without data."""
    parts = [(k, lengths.get(k) or []) for k in ("prompt", "chosen", "rejected")]
    parts = [(k, v) for k, v in parts if v]
    if not parts:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(parts), figsize=(3.6 * len(parts), 2.6), squeeze=False)
    for ax, (name, values), color in zip(axes.flat, parts, ("#7f7f7f", "#2ca02c", "#d62728")):
        ax.hist(values, bins=min(30, max(5, int(math.sqrt(len(values))) + 1)), color=color, alpha=0.8)
        ax.set_title(f"{name} tokens (mean {sum(values) / len(values):.0f}, max {max(values)})", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    return to_data_uri(fig)


def margin_figure(margins: dict[str, list[float]]) -> Optional[str]:
    """The eval split's reward margins before and after training, overlaid histograms on shared
    bins, with each one's share of pairs above 0 (preference accuracy). None without data."""
    parts = [(k, margins.get(k) or []) for k in ("before", "after")]
    parts = [(k, v) for k, v in parts if v]
    if not parts:
        return None
    plt = _plt()
    values = [x for _, v in parts for x in v]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n_bins = max(6, min(30, 2 * round(math.sqrt(max(len(v) for _, v in parts)))))  # few pairs: few bins
    bins = [lo + (hi - lo) * i / n_bins for i in range(n_bins + 1)]
    fig, ax = plt.subplots(figsize=(6.0, 3.1))
    for (name, v), color in zip(parts, ("#7f7f7f", "#1f77b4")):
        acc = sum(x > 0 for x in v) / len(v)
        ax.hist(v, bins=bins, alpha=0.55, color=color,
                label=f"{name} training: mean {sum(v) / len(v):.3f}, margin > 0 for {acc:.0%}")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("reward margin (chosen − rejected)", fontsize=9)
    ax.set_ylabel("eval pairs", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)  # above the bars
    ax.grid(alpha=0.3)
    return to_data_uri(fig)
