"""``report.html``: one offline page per run (or comparing runs) that shows what a run did.

The page holds the summary of the last logged values, a curve per logged metric (train line, eval
points), the eval split's reward-margin distribution before vs after training, the data report with
histograms of prompt / chosen / rejected token counts, side-by-side generations (``--report_generations
N``) and the resolved configuration. Figures are matplotlib PNGs embedded as data URIs, the page is
a jinja2 template (:mod:`preftune.report.template`): one file, no script, no network.

``preftune train`` writes ``report.html`` (and ``metrics.png``) into ``--output_dir`` at every save and
at the end (:mod:`preftune.train`); ``preftune report DIR [DIR ...]`` draws it again from the files,
one run or several compared on one page.
"""

from __future__ import annotations

import argparse

from preftune.report.collect import (
    EXTRAS_FILE,
    RunData,
    eval_margins,
    load_run,
    pair_lengths,
    save_extras,
)
from preftune.report.hook import ReportHook
from preftune.report.page import REPORT_FILE, render_runs, write_comparison, write_report

__all__ = ["EXTRAS_FILE", "REPORT_FILE", "ReportHook", "RunData", "eval_margins", "load_run", "pair_lengths",
           "save_extras", "render_runs", "write_report", "write_comparison", "main"]


def main(argv: list[str]) -> int:
    """``preftune report DIR [DIR ...] [--out FILE] [--title T]``: one run's page (default
    ``DIR/report.html``) or several runs on one page (default ``./report.html``)."""
    parser = argparse.ArgumentParser(prog="preftune report",
                                     description="Write report.html for a run, or one page comparing runs.")
    parser.add_argument("run_dirs", nargs="+", metavar="DIR")
    parser.add_argument("--out", default=None, help="The page to write (default: DIR/report.html for one run, "
                        "./report.html for several).")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if len(args.run_dirs) == 1:
        path = write_report(args.run_dirs[0], out=args.out, plot=args.out is None, title=args.title)
    else:
        path = write_comparison(args.run_dirs, args.out or REPORT_FILE, args.title)
    size = path.stat().st_size
    print(f"{path} ({size / 1024:.0f} KiB)")
    return 0
