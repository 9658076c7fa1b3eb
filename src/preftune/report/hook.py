"""The report during a ``preftune train`` run: what only the live run knows (token lengths, the eval
split's margins before and after training, generations), kept as ``report_data.json``, and
``report.html`` + ``metrics.png`` written at every checkpoint and at the end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from preftune.report.collect import eval_margins, pair_lengths, save_extras

logger = logging.getLogger("preftune.report")

MAX_MARGIN_PAIRS = 512  # the before/after margin histograms use at most this many eval pairs (two extra passes)
GENERATION_TOKENS = 64  # new tokens per --report_generations answer (greedy)


class ReportHook:
    """Report work around :func:`preftune.train.run`, on the main process only (margins only in a
    single process: a sharded model cannot run a forward on one rank alone).

    A report that cannot be drawn is a warning, never the end of a run: the page is a view of the run.
    """

    def __init__(self, trainer, model, tokenizer, config, data_report: str):
        self.trainer, self.model, self.tokenizer, self.config = trainer, model, tokenizer, config
        self.main = bool(trainer.args.should_save)
        train_pairs = getattr(trainer.train_dataset, "pairs", None) or []
        self.extras: dict[str, Any] = {"data_report": data_report, "lengths": pair_lengths(train_pairs)}

    @property
    def output_dir(self) -> Path:
        """The run's ``--output_dir``."""
        return Path(self.trainer.args.output_dir)

    def _eval_pairs(self) -> list:
        return list(getattr(self.trainer.eval_dataset, "pairs", None) or [])

    def _margin_pairs(self) -> Optional[list]:
        """The eval pairs whose margins the page shows, or None (no eval split, KTO's unpaired
        examples, several processes, or a reference loss without precomputed reference log-probs)."""
        from preftune.distributed import world_size

        pairs = self._eval_pairs()[:MAX_MARGIN_PAIRS]
        if not pairs or world_size() > 1 or any(p.label is not None for p in pairs):
            return None
        if self.config.loss.needs_reference and any(p.ref_chosen_logps is None for p in pairs):
            return None
        return pairs

    def _margins(self, when: str) -> None:
        pairs = self._margin_pairs()
        if pairs is None:
            return
        try:
            values = eval_margins(self.model, pairs, self.config.loss, self.config.engine,
                                  pad_token_id=self.tokenizer_pad(), batch_size=self.trainer.args.per_device_eval_batch_size,
                                  desc=f"eval margins ({when} training)")
        except Exception as exc:  # a view of the run, not part of it
            logger.warning("report: eval margins %s training not computed (%s: %s)", when, type(exc).__name__, exc)
            return
        self.extras.setdefault("eval_margins", {})[when] = values

    def tokenizer_pad(self) -> int:
        """The pad token id the batches use (0 when the tokenizer has none)."""
        from preftune.data.vision import text_tokenizer

        pad = text_tokenizer(self.tokenizer).pad_token_id
        return 0 if pad is None else int(pad)

    def before_training(self) -> None:
        """The eval split's margins under the starting model; ``report.html`` from now on at every checkpoint."""
        if not self.main:
            return
        self._margins("before")
        self.trainer.after_save = self._on_checkpoint

    def _on_checkpoint(self, checkpoint: Path) -> None:
        self.write(history=self.trainer.state.log_history)

    def _generations(self) -> None:
        from preftune.generate import generate_from_pairs

        n = int(getattr(self.config.training, "report_generations", 0) or 0)
        if not n:
            return
        pairs = self._eval_pairs() or list(getattr(self.trainer.train_dataset, "pairs", None) or [])
        try:
            rows = generate_from_pairs(self.model, self.tokenizer, pairs[:n], max_new_tokens=GENERATION_TOKENS)
        except Exception as exc:
            logger.warning("report: --report_generations failed (%s: %s)", type(exc).__name__, exc)
            return
        source = "eval" if self._eval_pairs() else "train (no eval split)"
        logger.info("report: %d generations on %s prompts (%d asked)", len(rows), source, n)
        self.extras["generations"] = rows

    def after_training(self) -> None:
        """After the final save: margins after training, ``--report_generations``, then the page."""
        if not self.main:
            return
        self._margins("after")
        self._generations()
        path = self.write()
        if path:
            logger.info("report: %s", path)

    def write(self, history: Optional[list[dict]] = None) -> Optional[Path]:
        """``report_data.json``, ``report.html`` and ``metrics.png`` in the output directory; None
        (with a warning) when they could not be written."""
        from preftune.report.page import write_report

        try:
            save_extras(self.output_dir, self.extras)
            return write_report(self.output_dir, history=history)
        except Exception as exc:
            logger.warning("report: %s not written (%s: %s)", self.output_dir / "report.html", type(exc).__name__, exc)
            return None
