"""Command-line and YAML parsing of the configuration groups.

Flags are built from the dataclass fields by :class:`transformers.HfArgumentParser`, one
argument group per dataclass (``preftune train --help`` is grouped); boolean flags accept
``--bf16``, ``--bf16 true`` and ``--no_bf16`` (= ``--bf16 false``; transformers' parser only adds the
``--no_`` form for a default of True, and TRL's documented commands use it where preftune changed the
default, e.g. ``--no_remove_unused_columns``). A YAML file gives the same keys; flags given on the command line
win. An unknown flag or YAML key is an error that suggests the closest valid name.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import enum
import types
import typing
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import yaml
from transformers import HfArgumentParser, TrainingArguments

from preftune.aliases.base import value_argv
from preftune.config import GROUPS, RunConfig
from preftune.constraints import check_numbers
from preftune.errors import ConfigError


class NegatableBool(argparse.Action):
    """A boolean flag ``--X [true|false]`` that also takes ``--no_X`` / ``--no-X`` (= ``--X false``): the
    argparse action of every boolean field whose default is not True (:func:`negatable_bools`)."""

    def __init__(self, option_strings, dest, nargs=None, const=None, **kwargs):
        name = option_strings[0][2:]
        self.negations = (f"--no_{name}", f"--no-{name.replace('_', '-')}")
        super().__init__([*option_strings, *self.negations], dest, nargs="?", const=True, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if values is None else values
        setattr(namespace, self.dest, not value if option_string in self.negations else value)


def negatable_bools(cls: type) -> type:
    """Give every boolean field of the dataclass ``cls`` whose default is not True a ``--no_`` form, for
    any :class:`HfArgumentParser` built on it (preftune's and TRL's ``TrlParser``), through the field's
    metadata (transformers passes it to ``add_argument``). Inherited fields are copied first, so the base
    class (``transformers.TrainingArguments``) is left as it is. Returns ``cls``."""
    hints = typing.get_type_hints(cls)
    own = cls.__dict__.get("__annotations__", {})
    for name, f in list(cls.__dataclass_fields__.items()):
        if not f.init or f.default is True or hints.get(name) not in (bool, Optional[bool]) \
                or f.metadata.get("action") is not None:
            continue
        if name not in own:  # inherited: a copy of the base's field, changed here only
            f = cls.__dataclass_fields__[name] = copy.copy(f)
        f.metadata = types.MappingProxyType({**f.metadata, "action": NegatableBool})
    return cls


@negatable_bools
@dataclass
class PreftuneTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with preftune's defaults (flags unchanged)."""

    _argument_group_name = "training (transformers.TrainingArguments)"

    output_dir: str = field(default="outputs/preftune", metadata={"help": "Where checkpoints and results go."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: batches are laid-out pairs."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Pairs per device and step."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Pairs per device in evaluation."})
    learning_rate: float = field(default=5e-6, metadata={"help": "Initial AdamW learning rate."})
    save_only_model: bool = field(default=False, metadata={"help": "Skip optimizer state in checkpoints."})
    disable_dropout: bool = field(
        default=True, metadata={"help": "Set every dropout probability of the model (and LoRA's) to 0, as TRL's "
                                "disable_dropout (its name and default; the TRL configs too)."})
    # run safety (preftune.guard, preftune.outputs; docs/reliability.md)
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Clear a --output_dir that holds an earlier run (refused by default)."})
    nan_policy: str = field(
        default="stop", metadata={"help": "A non-finite loss, loss term or gradient norm: stop (exit status 3, "
                                  "nothing saved as the final model) or skip_batch (that update is not applied)."})
    max_skipped_batches: int = field(
        default=10, metadata={"help": "--nan_policy skip_batch: stop when more updates than this were skipped."})
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "transformers' filter that hides NaN/inf losses in the logs; off in preftune "
                                 "(logged losses are the real values)."})
    report_generations: int = field(
        default=0, metadata={"help": "report.html: greedy generations of the base and tuned model for this many eval "
                             "prompts, beside chosen and rejected (0: none; docs/report.md)."})

    def __post_init__(self):
        import torch

        # finiteness and range of every number (preftune.constraints.RANGES), before transformers reads them;
        # a TRL-shaped config's message starts with its class name
        check_numbers(self, "" if type(self) is PreftuneTrainingArguments else f"{type(self).__name__}: ")

        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; silences a warning per epoch
        self._several_processes_on_cpu()
        from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

        if (self.bf16 or self.bf16_full_eval) and not self.use_cpu and not is_torch_bf16_gpu_available() \
                and not is_torch_xla_available() and not torch.cuda.is_available():
            # transformers refuses --bf16 without a bf16 accelerator unless --use_cpu; on a machine without
            # one, --bf16 (as ALMA's scripts pass it) can only mean bf16 autocast on the CPU
            import logging

            logging.getLogger("preftune.cli_args").info("--bf16 without a GPU: bf16 autocast on the CPU (--use_cpu true)")
            self.use_cpu = True
        super().__post_init__()
        # values transformers accepts here but that fail later with a traceback (DataLoader, AdamW)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.nan_policy not in ("stop", "skip_batch"):
            raise ConfigError(f"--nan_policy {self.nan_policy!r} is not valid; choose one of: stop, skip_batch")
        if self.max_skipped_batches < 0:
            raise ConfigError(f"--max_skipped_batches must be >= 0, got {self.max_skipped_batches}")
        if self.n_gpu > 1:  # several GPUs in one process: transformers would use nn.DataParallel, which
            # splits every batch tensor along dim 0 (a laid-out batch is not splittable that way)
            import logging

            logging.getLogger("preftune.cli_args").warning(
                "%d GPUs visible to one process: training on the first only; for data parallel training launch "
                "`torchrun --nproc_per_node %d -m preftune.cli train ...` (docs/distributed.md)", self.n_gpu, self.n_gpu)
            self._n_gpu = 1

    @cached_property
    def _setup_devices(self):
        device = TrainingArguments._setup_devices.func(self)
        from preftune.distributed import complete_deepspeed_cpu_state

        complete_deepspeed_cpu_state(self)  # DeepSpeed on CPUs: accelerate would see one process per rank
        return device

    def _several_processes_on_cpu(self) -> None:
        """Launched with several processes (``torchrun`` / ``accelerate launch``: ``$WORLD_SIZE`` > 1)
        on a machine without a GPU: data parallel on the CPU, over gloo (``--ddp_backend`` wins when
        given). Without this, accelerate sees no GPU, sets up no process group for the Trainer and
        every process trains its own copy. Under DeepSpeed the CPU accelerator keeps its own
        setup (only the backend is set)."""
        from preftune.distributed import has_accelerator, launched_world_size

        if launched_world_size() <= 1 or has_accelerator():
            return
        if self.ddp_backend is None:
            self.ddp_backend = "gloo"
        if not self.deepspeed:
            self.use_cpu = True


TRAIN_GROUPS = (*GROUPS, PreftuneTrainingArguments)  # RunConfig's order
for _group in GROUPS:
    negatable_bools(_group)


def _yaml_to_argv(config: dict[str, Any], source: str, valid: set[str]) -> list[str]:
    argv: list[str] = []
    for key, value in config.items():
        if key not in valid:
            hint = difflib.get_close_matches(key, sorted(valid), n=1)
            raise ConfigError(f"{source}: unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        if value is not None:
            argv += value_argv(key, value)
    return argv


def _valid_names(groups) -> set[str]:
    return {f.name for g in groups for f in dataclasses.fields(g) if f.init and not f.name.startswith("_")}


def make_parser(groups=TRAIN_GROUPS, prog: str = "preftune train") -> HfArgumentParser:
    """The grouped flag parser for ``groups``."""
    parser = HfArgumentParser(groups, prog=prog,
                              description="Preference-optimisation fine-tuning. Give an optional YAML config "
                                          "first; flags override it.")
    parser.add_argument("config", nargs="?", default=None, help="Optional YAML config file.")
    from preftune.aliases import add_help_group

    add_help_group(parser, _valid_names(groups))

    def error(message: str):  # argparse would print the whole (very long) usage, then exit 2
        raise ConfigError(f"{message} (see `{prog} --help`)")

    parser.error = error
    return parser


def parse_groups(argv: list[str], groups=TRAIN_GROUPS, prog: str = "preftune train") -> tuple:
    """Parse ``[CONFIG.yaml] [--flag value …]`` into one instance per group (flags win over YAML):
    a :class:`preftune.config.RunConfig` for the training groups, a tuple in ``groups``' order otherwise.

    Raises :class:`ConfigError` for an unknown flag or key (with the closest valid name), a
    missing or unreadable YAML file, and any group's own validation error.
    """
    parser = make_parser(groups, prog)
    yaml_argv: list[str] = []
    if argv and not argv[0].startswith("-"):
        path = Path(argv[0])
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:  # issue 25: the line of the first byte that is not UTF-8
            line = exc.object[:exc.start].count(b"\n") + 1
            raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); "
                              "save the file as UTF-8") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of flag names to values")
        from preftune.aliases import translate_yaml

        # a LLaMA-Factory config is read with its defaults; any other YAML takes the same names as the flags
        cli = {t[2:].split("=", 1)[0] for t in argv[1:] if t.startswith("--")}
        yaml_argv = translate_yaml(loaded, str(path), _valid_names(groups), cli)
        argv = argv[1:]
    from preftune.aliases import apply_aliases, suggestion

    # other tools' flags (ms-swift, ORPO scripts, ALMA) → preftune's, from the YAML and the command line
    # alike (the command line's come later and win); that tool's defaults go first
    aliased = apply_aliases(yaml_argv + argv, _valid_names(groups), preset=yaml_argv)
    argv = aliased.argv
    valid_flags = sorted({"--" + n for n in _valid_names(groups)}
                         | {s for s in parser._option_string_actions if s.startswith("--no_")})
    for token in argv:
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            if name not in valid_flags and name not in ("--help",):
                hint = suggestion(name[2:], _valid_names(groups))
                hint = hint and f"--{hint}" or next(iter(difflib.get_close_matches(name, valid_flags, n=1)), None)
                raise ConfigError(f"unknown flag {name}" + (f"; did you mean {hint}?" if hint else "")
                                  + f" (see `{prog} --help`)")
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(aliased.defaults + argv,
                                                                return_remaining_strings=True)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc
    # the positional `config` is returned as an extra namespace; drop it
    parsed = [p for p in parsed if not hasattr(p, "config") or dataclasses.is_dataclass(p)]
    if remaining:
        raise ConfigError(f"unexpected arguments: {' '.join(remaining)}")
    return RunConfig(*parsed) if tuple(groups) == tuple(TRAIN_GROUPS) else tuple(parsed)


def config_to_yaml(groups: tuple) -> str:
    """The resolved configuration as YAML (every preftune field; TrainingArguments fields that differ
    from transformers' defaults), loadable by :func:`parse_groups`."""
    out: dict[str, Any] = {}
    for g in groups:
        if isinstance(g, TrainingArguments):
            from preftune.distributed import preserved_accelerate_state

            with preserved_accelerate_state():  # a TrainingArguments rebuilds accelerate's state from its fields
                default = PreftuneTrainingArguments()
            for f in dataclasses.fields(PreftuneTrainingArguments):
                if not f.init or f.name.startswith("_"):
                    continue
                value = getattr(g, f.name)
                if f.name == "gradient_checkpointing":  # deprecated alias of activation_checkpointing
                    continue
                if value != getattr(default, f.name) or f.name == "output_dir":
                    out[f.name] = _plain(value)
        else:
            for f in dataclasses.fields(g):
                if f.init and not f.name.startswith("_"):
                    out[f.name] = _plain(getattr(g, f.name))
    return yaml.safe_dump(out, sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)
