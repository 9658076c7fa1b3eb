"""The training recipe: setup → train → save.

``preftune train`` parses the configuration groups (:mod:`preftune.cli_args`) and calls
:func:`run`. Each stage is a small function so that the lifecycle stays visible:

* :func:`setup` — the output directory checked, then :func:`preftune.run_setup.prepare_run` (seed, model +
  tokenizer (+ LoRA), data, reference log-probs; the TRL door runs the same function), the trainer;
* :func:`train` — ``Trainer.train`` (resuming from ``latest`` or a path when asked);
* :func:`save` — adapter or model + tokenizer, ``trainer_state.json`` (with ``log_history``),
  ``train_results.json`` and the resolved ``preftune_config.yaml``;
* ``report.html`` and ``metrics.png`` (:mod:`preftune.report`) at every checkpoint and after the final
  save, with the eval split's reward margins before and after training (:class:`ReportHook`).
"""

from __future__ import annotations

import logging
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

from preftune import outputs
from preftune.cli_args import config_to_yaml
from preftune.config import ConfigError, RunConfig
from preftune.report import ReportHook
from preftune.run_setup import prepare_run
from preftune.trainer import PreferenceTrainer
from preftune.trl_support import disable_dropout

logger = logging.getLogger("preftune.train")


@dataclass
class Run:
    """Everything a training run holds after :func:`setup`."""

    config: RunConfig
    model: Any
    tokenizer: Any
    trainer: PreferenceTrainer
    data_report: str


def setup(config: RunConfig) -> Run:
    """The CLI door: check ``--output_dir`` (before anything is loaded), then the one setup
    (:func:`preftune.run_setup.prepare_run`: seed, model, data, reference) and the trainer.
    ``--disable_dropout`` (default true, as TRL and :mod:`preftune.trl`): every dropout of the model and
    of LoRA set to 0, so both doors train the same way."""
    if config.training.disable_tqdm:  # every bar of the run (reference pass, GGUF, margins, generations), not only the
        os.environ["TQDM_DISABLE"] = "1"  # Trainer's (preftune.engine.reference.progress_disabled reads it)
    if getattr(config.training, "report_generations", 0) < 0:
        raise ConfigError(f"--report_generations must be >= 0, got {config.training.report_generations}")
    dropout_off = getattr(config.training, "disable_dropout", False)
    if dropout_off and config.peft.use_peft and config.peft.lora_dropout:
        logger.info("--disable_dropout true: --lora_dropout %s not applied (LoRA dropout 0, as TRL); "
                    "--disable_dropout false keeps it", config.peft.lora_dropout)
        config.peft.lora_dropout = 0.0  # the resolved config then says what runs (the TRL door does the same)
    # several processes: the main process checks (and clears or locks) the output directory first
    with config.training.main_process_first(local=False, desc="preparing the output directory"):
        outputs.prepare_output_dir(config)  # writable, not another run's, resume config matches
    prepared = prepare_run(config)
    if dropout_off:  # the model's own dropout (T5's dropout_rate ...), a continued adapter's LoRA dropout
        for module in (prepared.model, prepared.ref_model):
            if module is not None:
                disable_dropout(module)
    trainer = PreferenceTrainer(**prepared.trainer_kwargs())
    trainer.run_config_yaml = prepared.config_yaml  # written into every checkpoint (resume checks it)
    outputs.check_room_for_run(trainer)  # a full disk fails now, not at the first save
    return Run(config, prepared.model, prepared.tokenizer, trainer, prepared.data.report)


def resolve_checkpoint(value: Optional[str], output_dir: str) -> Optional[str]:
    """``latest`` → the newest *complete* ``checkpoint-*`` in ``output_dir`` (partial or corrupted
    ones skipped with a warning); a path as is (verified when it has a completeness marker);
    None/false → None. See :func:`preftune.outputs.resolve_checkpoint`.

    Raises ``FileNotFoundError`` when ``latest`` finds no complete checkpoint or the path is missing.
    """
    return outputs.resolve_checkpoint(value, output_dir)


def train(run: Run) -> dict[str, float]:
    """Train (resuming when asked) and return the train metrics."""
    args = run.trainer.args
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    result = run.trainer.train(resume_from_checkpoint=checkpoint)
    return dict(result.metrics)


def save(run: Run, metrics: dict[str, float]) -> Path:
    """Write the adapter (or model), tokenizer, state, results (``eval_*`` also to
    ``eval_results.json``) and resolved config to output_dir: staged, then moved into place, the
    weights checked for non-finite values first (:func:`preftune.outputs.save_final`)."""
    from preftune.engine.kinds import kind_for

    out = outputs.save_final(run.trainer, run.model, run.tokenizer, metrics,
                             {"preftune_config.yaml": run.trainer.run_config_yaml or config_to_yaml(run.config),
                              "data_report.txt": run.data_report + "\n"})
    logger.info("saved to %s", out)
    kind_for(run.model).save_extras(run.model, out)  # a reward model's value_head.safetensors (ms-swift's file)
    copy_dir = run.config.peft.lora_adapter_dir  # --lora_adapter_dir (ORPO scripts): a second copy
    if copy_dir and hasattr(run.model, "peft_config"):
        from preftune.models import save_adapter

        save_adapter(run.model, copy_dir)
        run.tokenizer.save_pretrained(copy_dir)
        logger.info("adapter also written to %s (--lora_adapter_dir)", copy_dir)
    return out


def run(config: RunConfig) -> dict[str, float]:
    """The whole lifecycle; returns the train metrics (plus the final eval metrics when there is an eval split)."""
    try:
        r = setup(config)
        report = ReportHook(r.trainer, r.model, r.tokenizer, config, r.data_report)
        report.before_training()  # the eval split's margins at step 0; report.html at every checkpoint
        metrics = train(r)
        if r.trainer.eval_dataset is not None:
            state = r.trainer.state
            last = [h for h in state.log_history if "eval_loss" in h]
            if last and last[-1].get("step") == state.global_step:  # evaluated at the last step already
                eval_metrics = {k: v for k, v in last[-1].items() if k.startswith("eval_")}
            else:
                eval_metrics = r.trainer.evaluate()
            metrics.update(eval_metrics)  # save() writes them to eval_results.json too
        save(r, metrics)
        report.after_training()  # margins after, --report_generations, report.html and metrics.png
    finally:  # the output directory's lock (taken by setup), so a later run in another process may use it
        outputs.release_output_dir(config.training.output_dir)
    return metrics


CLI_LOGGING_STEPS = 10  # --logging_steps' default in preftune.cli_args (an explicit value is kept)
LOG_POINTS = 50  # about this many logged points per run when --logging_steps is not given


def logging_steps_given(argv: list[str]) -> bool:
    """Whether ``preftune train``'s arguments set ``--logging_steps``: as a flag, or as a key of the
    YAML file given first (a LLaMA-Factory or ms-swift default arrives as another value than 10)."""
    if any(a == "--logging_steps" or a.startswith("--logging_steps=") for a in argv):
        return True
    if argv and not argv[0].startswith("-") and Path(argv[0]).is_file():
        import yaml

        try:
            loaded = yaml.safe_load(Path(argv[0]).read_text())
        except (OSError, yaml.YAMLError):
            return False  # parse_groups has already reported a broken file
        return isinstance(loaded, dict) and "logging_steps" in loaded
    return False


def apply_logging_default(config: RunConfig, given: bool) -> None:
    """No ``--logging_steps`` given: log about :data:`LOG_POINTS` points per run, whatever its length
    (a curve on a 20-step demo, not 2 points; not 5,000 points on a long run). transformers reads a
    ``logging_steps`` below 1 as a share of the run's total steps (``ceil(max_steps · ratio)``, at
    least every step), so the ratio ``1 / LOG_POINTS`` does it once the step count is known. The TRL
    door keeps TRL's ``logging_steps`` default."""
    args = config.training
    if not given and args.logging_steps == CLI_LOGGING_STEPS and args.logging_strategy == "steps":
        args.logging_steps = 1 / LOG_POINTS


class TrainResult(NamedTuple):
    """What :func:`run_config` (``preftune.train(config)``) returns; unpacks as ``out, metrics = ...``.

    ``output_dir``: the directory holding the adapter (or model), tokenizer, ``trainer_state.json``,
    ``train_results.json`` and ``preftune_config.yaml``. ``metrics``: the train metrics
    (``train_loss``, ``train_runtime`` ...) plus the final ``eval_*`` metrics when there is an eval split.
    """

    output_dir: Path
    metrics: dict[str, float]


def run_config(config: Union[dict, str, Path, tuple], **overrides: Any) -> TrainResult:
    """``preftune train`` from Python (a notebook, a script): parse, train, save; return where and how it went.

    ``config``: a dict of flag names to values (the keys of a YAML config, e.g.
    ``{"loss": "dpo", "use_peft": True, "max_steps": 10}``), the path of a YAML config, or the tuple
    of configuration groups (:func:`preftune.cli_args.parse_groups`'s result). ``overrides``: more
    ``flag=value`` pairs that win over ``config``, as flags win over a YAML file; not allowed with a
    :class:`~preftune.config.RunConfig`. Also callable as ``preftune.train(config, **overrides)``.

    Raises :class:`preftune.config.ConfigError` (unknown key, with the closest valid name; invalid
    value), :class:`preftune.data.DataError` and :class:`preftune.errors.ModelLoadError` like the CLI.
    """
    from preftune.cli_args import TRAIN_GROUPS, _valid_names, _yaml_to_argv, parse_groups
    from preftune.config import ConfigError

    source = "preftune.train(config)"
    if isinstance(config, tuple):
        if overrides:
            raise ConfigError(f"{source}: keyword overrides need a dict or YAML config, not a tuple of groups")
        groups = RunConfig(*config)
    elif isinstance(config, dict):
        groups = parse_groups(_yaml_to_argv({**config, **overrides}, source, _valid_names(TRAIN_GROUPS)))
    elif isinstance(config, (str, Path)):
        extra = _yaml_to_argv(overrides, source, _valid_names(TRAIN_GROUPS))
        groups = parse_groups([str(config), *extra])
    else:
        raise ConfigError(f"{source}: expected a dict, a YAML path or a tuple of config groups, "
                          f"got {type(config).__name__}")
    if isinstance(config, tuple):  # groups parsed by the caller: their logging_steps is kept as it is
        given = True
    else:
        given = "logging_steps" in config if isinstance(config, dict) else logging_steps_given([str(config)])
    apply_logging_default(groups, given or "logging_steps" in overrides)
    metrics = run(groups)
    return TrainResult(Path(groups.training.output_dir), metrics)


class _CallableModule(types.ModuleType):
    """Makes ``preftune.train(config)`` work: importing this submodule binds the *module* to the
    package attribute ``train``, so the module itself forwards calls to :func:`run_config`."""

    def __call__(self, config: Union[dict, str, Path, tuple], **overrides: Any) -> TrainResult:
        return run_config(config, **overrides)


sys.modules[__name__].__class__ = _CallableModule
