"""``preftune`` command line: ``train``, ``evaluate``, ``generate``, ``score``, ``plot``, ``report`` and ``mt``.

Configuration and data errors are printed as one clear message (no traceback) and exit with
status 2; a run stopped by the non-finite guard (:class:`preftune.guard.NonFiniteError`) exits
with status 3; a full disk (:class:`preftune.errors.DiskFullError`, or any ``ENOSPC``) with status 4;
``PREFTUNE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional

USAGE = """usage: preftune <command> [options]

commands:
  train      [CONFIG.yaml] [--flag value ...]  preference (or SFT) fine-tuning; `preftune train --help`
  evaluate   --dataset FILE [--adapter DIR] ...  preference accuracy and mean reward margin
  generate   --adapter DIR [--dataset FILE]       side-by-side generations: base vs adapter (+ chosen/rejected)
  score      --adapter DIR --dataset FILE --output OUT.jsonl   rewards of a reward model (--loss rm) per record
  plot       OUTPUT_DIR [--metrics ...]          plot metrics from trainer_state.json
  report     OUTPUT_DIR [OUTPUT_DIR ...]         report.html: one run's page, or several runs compared
  mt         build-triplets | translate | evaluate   the ALMA-R machine-translation workflow
"""


class _DropMessage(logging.Filter):
    """Drops log records whose message contains ``text`` (a library's warning that does not apply)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _quiet_known_warnings() -> None:
    """Warnings of the stack that say nothing about the user's run, each filtered with why."""
    import warnings

    # bitsandbytes (installed with preftune[qlora]) tries, when it is imported on a CPU with AVX-512 BF16,
    # to fetch an optional faster CPU 4-bit matmul from the Hub's kernels-community through the `kernels`
    # package, and warns when that package is missing; its own CPU kernel is used instead, with the same
    # numbers. preftune needs neither (4-bit only with --load_in_4bit), so the line is noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))
    # peft 0.17+ reads `model.is_gradient_checkpointing` when it wraps a model (peft_model.py, prepare for
    # LoRA); transformers 5 deprecated that property in favour of `is_activation_checkpointing`. The value
    # read is right; the warning is peft's to fix (an upgrade of peft removes it), not the user's.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.logging.set_verbosity_warning()
    _quiet_known_warnings()


def cmd_train(argv: list[str]) -> int:
    from preftune.cli_args import parse_groups
    from preftune.distributed import is_main_process
    from preftune.train import apply_logging_default, logging_steps_given, run

    groups = parse_groups(argv)
    apply_logging_default(groups, logging_steps_given(argv))  # about 50 logged points unless --logging_steps
    metrics = run(groups)
    if is_main_process():  # several processes (torchrun): the results once
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=1))
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    from preftune.cli_args import parse_groups
    from preftune.config import DataArguments, EngineArguments, LossArguments, ModelArguments
    from preftune.evaluate import EvaluateArguments, run_evaluate

    groups = (ModelArguments, DataArguments, LossArguments, EngineArguments, EvaluateArguments)
    # `--model` is accepted as a short form of --model_name_or_path
    argv = ["--model_name_or_path" if a == "--model" else a for a in argv]
    model_args, data_args, loss_args, engine_args, eval_args = parse_groups(argv, groups, prog="preftune evaluate")
    metrics = run_evaluate(model_args, data_args, loss_args, engine_args, eval_args)
    text = json.dumps(metrics, indent=1)
    print(text)
    if eval_args.output_json:
        with open(eval_args.output_json, "w") as fh:
            fh.write(text + "\n")
    return 0


def cmd_plot(argv: list[str]) -> int:
    from preftune.plots import main as plot_main

    return plot_main(argv)


def cmd_report(argv: list[str]) -> int:
    from preftune.report import main as report_main

    return report_main(argv)


def cmd_generate(argv: list[str]) -> int:
    from preftune.generate import main as generate_main

    return generate_main(argv)


def cmd_score(argv: list[str]) -> int:
    from preftune.cli_args import parse_groups
    from preftune.config import DataArguments, EngineArguments, ModelArguments
    from preftune.score import ScoreArguments, run_score

    groups = (ModelArguments, DataArguments, EngineArguments, ScoreArguments)
    argv = ["--model_name_or_path" if a == "--model" else a for a in argv]
    model_args, data_args, engine_args, score_args = parse_groups(argv, groups, prog="preftune score")
    summary = run_score(model_args, data_args, engine_args, score_args)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_mt(argv: list[str]) -> int:
    from preftune.mt.cli import main as mt_main

    return mt_main(argv)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "generate": cmd_generate, "plot": cmd_plot,
            "mt": cmd_mt, "score": cmd_score, "report": cmd_report}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``preftune`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        hint = difflib.get_close_matches(command, list(COMMANDS), n=1)
        print(f"preftune: unknown command {command!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""),
              file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    _setup_logging()
    from preftune.errors import EXIT_DISK_FULL, EXIT_NON_FINITE, EXIT_USER_ERROR, USER_ERRORS, NonFiniteError

    try:
        return COMMANDS[command](rest)
    except NonFiniteError as exc:  # the run diverged: the guard's one line, exit 3 (not an input error)
        if os.environ.get("PREFTUNE_DEBUG"):
            raise
        print(f"preftune {command}: error: {exc}", file=sys.stderr)
        return EXIT_NON_FINITE
    except (*USER_ERRORS, FileNotFoundError) as exc:
        if os.environ.get("PREFTUNE_DEBUG"):
            raise
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # one line
        print(f"preftune {command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # a full disk (DiskFullError from the writers, or any other ENOSPC): one line, exit 4
        if os.environ.get("PREFTUNE_DEBUG") or exc.errno not in (28, 122):  # ENOSPC, EDQUOT
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"preftune {command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_DISK_FULL


if __name__ == "__main__":
    sys.exit(main())
