"""Flags that users bring from ms-swift, ORPO training scripts and ALMA, accepted as aliases.

A command line copied from ``swift rlhf``, the ORPO guide's ``train.py`` or ALMA's
``runs/cpo_ft.sh`` runs with ``preftune train`` as written. :func:`apply_aliases` rewrites such a
command line into preftune's own flags before it is parsed (:func:`preftune.cli_args.parse_groups`):

* an alias becomes the preftune flag it means (``--sft_type lora`` → ``--use_peft true``); each
  translation is logged once;
* a flag that has no effect in preftune is accepted with a logged ``ignored: why`` line, never
  silently;
* a flag that cannot be honoured (``--model_type NAME`` without a model path, ``--rlhf_type kto``)
  is a :class:`~preftune.config.ConfigError`;
* a command line recognised as one tool's (by flags only that tool has) gets that tool's defaults
  instead of preftune's (:data:`SWIFT_DEFAULTS_RELEASE`, :data:`ORPO_SCRIPT_DEFAULTS`,
  :data:`ALMA_DEFAULTS`), announced in one log line. Flags given on the command line or in the
  YAML file always win over these defaults, and preftune's own flag wins over an alias of it.

An alias applies only while its name is not one of preftune's flags: when a later preftune
version gives a name a meaning of its own, that meaning wins. ``--help`` lists the aliases in
their own group (:func:`add_help_group`).

Sources (read, not copied): ms-swift ``swift/arguments/rlhf_args.py``, ``sft_args.py``,
``tuner_args.py``, ``trainers/arguments.py`` (release 4.5.2) and ``swift/llm/utils/argument.py``
(release 2.6.1); the ORPO guide ("ORPO训练指南", its parameter list); ALMA ``utils/arguments.py``,
``run_cpo_llmmt.py`` and ``runs/cpo_ft.sh`` (github.com/fe1ixxu/ALMA).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from preftune.config import ConfigError

logger = logging.getLogger("preftune.aliases")

SWIFT, ORPO, ALMA = "ms-swift", "ORPO script", "ALMA"
HELP_TITLE = "aliases from ms-swift / ORPO scripts / ALMA"

SWIFT_DEFAULTS_RELEASE = "4.5.2"  # `swift rlhf` defaults followed for a swift 3.x / 4.x command line
SWIFT2_DEFAULTS_RELEASE = "2.6.1"  # ... and for a swift 2.x one (flags that only swift 2.x has)
SWIFT2_MARKERS = ("sft_type", "model_id_or_path", "dataset_test_ratio", "lora_dropout_p", "use_flash_attn",
                  "eval_batch_size")

# --rlhf_type → --loss; simpo is decided by cpo_alpha (see _rlhf_type)
RLHF_TYPES = {"dpo": "dpo", "cpo": "cpo", "orpo": "orpo", "simpo": "simpo", "rm": "rm"}
RLHF_UNSUPPORTED = ("kto", "ppo", "grpo", "gkd")
TUNER_TYPES = {"lora": "true", "full": "false"}

# Defaults of the ORPO guide's script (its parameter list) and of ALMA's run_cpo_llmmt.py.
ORPO_SCRIPT_DEFAULTS = {"loss": "orpo", "use_peft": "true", "eval_ratio": "0.05", "beta": "0.1",
                        "max_length": "2048", "max_prompt_length": "1024", "lora_r": "16", "lora_alpha": "32",
                        "lora_dropout": "0.05"}
ALMA_DEFAULTS = {"loss": "cpo"}  # run_cpo_llmmt.py trains TRL's CPOTrainer (CPOConfig's defaults otherwise)

_TRUE, _FALSE = ("true", "1", "yes", "y", "t", "on"), ("false", "0", "no", "n", "f", "off")


@dataclass
class Context:
    """What the aliases see: the real flag names, the flags given explicitly (real names; YAML keys
    included) with their values, and the log lines of this translation."""

    valid: set[str]
    explicit: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)
    produced: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # flag -> (alias, its values)

    def given(self, name: str) -> bool:
        return name in self.explicit or name in self.produced

    def value(self, name: str, default: str) -> str:
        """The value of ``--name`` as given (explicitly, else by an alias), else ``default``."""
        if name in self.explicit:
            return " ".join(self.explicit[name]) or "true"
        if name in self.produced:
            return " ".join(self.produced[name][1])
        return default


@dataclass(frozen=True)
class Alias:
    """One foreign flag: ``flag`` (without ``--``), the tools it comes from, its ``--help`` text and
    ``convert(values, ctx) -> preftune tokens`` (which logs through ``ctx.notes`` and may raise
    :class:`ConfigError`). ``noted``: a real flag of preftune's that has no effect, logged and kept."""

    flag: str
    sources: tuple[str, ...]
    help: str
    convert: Callable[[str, list[str], Context], list[str]]
    metavar: Optional[str] = None
    noted: bool = False
    targets: tuple[str, ...] = ()


def _as_bool(flag: str, values: list[str]) -> bool:
    if not values:
        return True
    if len(values) == 1 and values[0].lower() in _TRUE + _FALSE:
        return values[0].lower() in _TRUE
    raise ConfigError(f"--{flag} {' '.join(values)}: expected true or false")


def _one(flag: str, values: list[str]) -> str:
    if len(values) != 1:
        raise ConfigError(f"--{flag} takes one value, got {len(values)}" + (f": {' '.join(values)}" if values else ""))
    return values[0]


def _mapping(alias: str, values: list[str], target: str, new_values: list[str], ctx: Context) -> list[str]:
    """``--target new_values`` unless preftune's own ``--target`` was given (that one wins)."""
    shown = f"--{alias}" + (f" {' '.join(values)}" if values else "")
    if target in ctx.explicit:
        ctx.notes.append(f"{shown}: not used, --{target} {' '.join(ctx.explicit[target])} is given")
        return []
    if target in ctx.produced:
        ctx.notes.append(f"{shown}: not used, --{target} comes from --{ctx.produced[target][0]} already")
        return []
    ctx.produced[target] = (alias, list(new_values))
    ctx.notes.append(f"{shown} → --{target} {' '.join(new_values)}".rstrip())
    return [f"--{target}", *new_values]


def rename(flag: str, target: str, sources: tuple[str, ...], help: str, *, boolean: bool = False,
           values: Optional[dict[str, str]] = None, metavar: Optional[str] = None) -> Alias:
    """``--flag V`` means ``--target V`` (``boolean``: bare flag = true; ``values``: a value map)."""

    def convert(name: str, given: list[str], ctx: Context) -> list[str]:
        if boolean:
            new = ["true" if _as_bool(name, given) else "false"]
        elif values is not None:
            value = _one(name, given)
            if value not in values:
                raise ConfigError(f"--{name} {value!r} is not supported; choose one of: {', '.join(values)}")
            new = [values[value]]
        else:
            if not given:
                raise ConfigError(f"--{name} needs a value")
            new = list(given)
        return _mapping(name, given, target, new, ctx)

    return Alias(flag, sources, help, convert, metavar, targets=(target,))


def ignored(flag: str, sources: tuple[str, ...], why: str, *, noted: bool = False) -> Alias:
    """``--flag [V]`` has no effect in preftune: accepted and logged with ``why``."""

    def convert(name: str, given: list[str], ctx: Context) -> list[str]:
        shown = f"--{name}" + (f" {' '.join(given)}" if given else "")
        ctx.notes.append(f"{shown}: ignored: {why}")
        return [f"--{name}", *given] if noted else []

    return Alias(flag, sources, f"accepted, no effect: {why}", convert, noted=noted)


def _model_type(name: str, given: list[str], ctx: Context) -> list[str]:
    value = " ".join(given)
    if ctx.given("model_name_or_path"):
        ctx.notes.append(f"--{name} {value}: ignored: preftune reads the architecture from the model's config.json")
        return []
    raise ConfigError(f"--{name} {value}: a model-registry key of ms-swift, which preftune cannot resolve "
                      "(offline, without swift); pass the model itself: --model PATH (a directory or Hub id; "
                      "same as --model_name_or_path)")


def _tuner(name: str, given: list[str], ctx: Context) -> list[str]:
    value = _one(name, given)
    if value not in TUNER_TYPES:
        raise ConfigError(f"--{name} {value}: preftune trains LoRA adapters (lora) or all weights (full); "
                          f"{value} is not supported")
    return _mapping(name, given, "use_peft", [TUNER_TYPES[value]], ctx)


def _quantization_bit(name: str, given: list[str], ctx: Context) -> list[str]:
    value = _one(name, given)
    if value in ("0", "none", "None"):
        ctx.notes.append(f"--{name} {value}: no quantisation (the default)")
        return []
    if value not in ("4", "8"):
        raise ConfigError(f"--{name} {value}: preftune loads 4-bit or 8-bit base weights (bitsandbytes); "
                          "choose 4, 8 or 0")
    return _mapping(name, given, f"load_in_{value}bit", ["true"], ctx)


def flash_attention_tokens(name: str, wanted: bool, ctx: Context) -> list[str]:
    """``--attn_implementation flash_attention_2`` when flash attention is asked for and the
    ``flash_attn`` package is importable; otherwise one logged line and the default kernel."""
    if not wanted:
        ctx.notes.append(f"--{name} false: the default attention kernel")
        return []
    if "attn_implementation" in ctx.explicit:
        ctx.notes.append(f"--{name}: not used, --attn_implementation {' '.join(ctx.explicit['attn_implementation'])}"
                         " is given")
        return []
    if importlib.util.find_spec("flash_attn") is None:
        ctx.notes.append(f"--{name}: the flash-attn package is not installed here; using the default attention "
                         "kernel (sdpa) instead of flash_attention_2")
        return []
    return _mapping(name, ["true"], "attn_implementation", ["flash_attention_2"], ctx)


def _flash(name: str, given: list[str], ctx: Context) -> list[str]:
    return flash_attention_tokens(name, _as_bool(name, given), ctx)


def _attn_impl(name: str, given: list[str], ctx: Context) -> list[str]:
    value = _one(name, given)
    kernel = {"flash_attn": "flash_attention_2"}.get(value, value)
    return _mapping(name, given, "attn_implementation", [kernel], ctx)


def _rlhf_type(name: str, given: list[str], ctx: Context) -> list[str]:
    value = _one(name, given)
    if value in RLHF_UNSUPPORTED:
        raise ConfigError(f"--{name} {value} is not supported by preftune; choose one of: {', '.join(RLHF_TYPES)}")
    if value not in RLHF_TYPES:
        raise ConfigError(f"--{name} {value!r} is not valid; choose one of: {', '.join(RLHF_TYPES)}")
    loss = RLHF_TYPES[value]
    if value == "simpo":  # swift runs SimPO as TRL's CPO trainer, whose cpo_alpha (swift default 1.0) adds the NLL
        alpha = _explicit_float(ctx, "cpo_alpha", default=1.0)
        loss = "cpo-simpo" if alpha > 0 else "simpo"
    return _mapping(name, given, "loss", [loss], ctx)


def _explicit_float(ctx: Context, name: str, default: float) -> float:
    if name not in ctx.explicit:
        return default
    try:
        return float(_one(name, ctx.explicit[name]))
    except ValueError as err:
        raise ConfigError(f"--{name} {' '.join(ctx.explicit[name])}: expected a number") from err


ALIASES: tuple[Alias, ...] = (
    # ---- ms-swift (`swift rlhf`) ----------------------------------------------------------------
    Alias("rlhf_type", (SWIFT,), "dpo, cpo, orpo, simpo, rm → --loss (simpo with --cpo_alpha > 0, swift's default "
          "1.0, is cpo-simpo, as in swift)", _rlhf_type, "{dpo,cpo,orpo,simpo,rm}", targets=("loss",)),
    Alias("sft_type", (SWIFT,), "swift 2.x: lora → --use_peft true, full → --use_peft false", _tuner, "{lora,full}",
          targets=("use_peft",)),
    Alias("train_type", (SWIFT,), "swift 3.x: as --sft_type", _tuner, "{lora,full}", targets=("use_peft",)),
    Alias("tuner_type", (SWIFT,), "swift 4.x: as --sft_type", _tuner, "{lora,full}", targets=("use_peft",)),
    rename("model", "model_name_or_path", (SWIFT,), "→ --model_name_or_path (a directory or Hub id)", metavar="PATH"),
    rename("model_id_or_path", "model_name_or_path", (SWIFT,), "swift 2.x: → --model_name_or_path", metavar="PATH"),
    Alias("model_type", (SWIFT,), "a swift model-registry key: an error unless the model is given by path "
          "(--model PATH), then ignored", _model_type, "NAME"),
    rename("batch_size", "per_device_train_batch_size", (SWIFT,), "→ --per_device_train_batch_size", metavar="N"),
    rename("eval_batch_size", "per_device_eval_batch_size", (SWIFT,), "swift 2.x: → --per_device_eval_batch_size",
           metavar="N"),
    rename("lora_rank", "lora_r", (SWIFT, ALMA), "→ --lora_r", metavar="R"),
    rename("lora_dropout_p", "lora_dropout", (SWIFT,), "swift 2.x: → --lora_dropout", metavar="P"),
    rename("target_modules", "lora_target_modules", (SWIFT,), "swift 3.x/4.x: → --lora_target_modules (DEFAULT: the "
           "attention's query/key/value projections, ALL: every linear layer)", metavar="NAME"),
    rename("val_dataset", "eval_file", (SWIFT,), "→ --eval_file", metavar="FILE"),
    rename("split_dataset_ratio", "eval_ratio", (SWIFT,), "→ --eval_ratio", metavar="R"),
    rename("dataset_test_ratio", "eval_ratio", (SWIFT,), "swift 2.x: → --eval_ratio", metavar="R"),
    rename("torch_dtype", "dtype", (SWIFT, ALMA), "→ --dtype", metavar="DTYPE"),
    Alias("attn_impl", (SWIFT,), "→ --attn_implementation (flash_attn = flash_attention_2)", _attn_impl, "KERNEL",
          targets=("attn_implementation",)),
    Alias("use_flash_attn", (SWIFT,), "swift 2.x: as --use_flash_attention", _flash, "BOOL",
          targets=("attn_implementation",)),
    Alias("quantization_bit", (SWIFT,), "4 → --load_in_4bit true, 8 → --load_in_8bit true (bitsandbytes)",
          _quantization_bit, "{0,4,8}", targets=("load_in_4bit", "load_in_8bit")),
    # ---- the ORPO guide's train.py ----------------------------------------------------------------
    rename("train_file", "dataset", (ORPO,), "→ --dataset", metavar="FILE"),
    rename("use_4bit", "load_in_4bit", (ORPO,), "→ --load_in_4bit (QLoRA)", boolean=True, metavar="BOOL"),
    rename("use_8bit", "load_in_8bit", (ORPO,), "→ --load_in_8bit", boolean=True, metavar="BOOL"),
    Alias("use_flash_attention", (ORPO,), "true → --attn_implementation flash_attention_2 where the flash-attn package "
          "is installed, else one logged line and the default kernel", _flash, "BOOL",
          targets=("attn_implementation",)),
    # ---- ALMA's run_cpo_llmmt.py (runs/cpo_ft.sh) ---------------------------------------------------
    rename("cpo_data_path", "dataset", (ALMA,), "→ --dataset (ALMA-R triplets)", metavar="PATH"),
    rename("mmt_data_path", "dataset", (ALMA,), "→ --dataset", metavar="PATH"),
    rename("tokenizer_name", "tokenizer_name_or_path", (ALMA,), "→ --tokenizer_name_or_path", metavar="PATH"),
    rename("evaluation_strategy", "eval_strategy", (ALMA,), "→ --eval_strategy (the name before transformers 4.46)",
           metavar="STRATEGY"),
    rename("max_source_length", "max_prompt_length", (ALMA,), "→ --max_prompt_length (an explicit "
           "--max_prompt_length wins)", metavar="N"),
    Alias("use_flash_attention_2", (ALMA,), "as --use_flash_attention", _flash, "BOOL",
          targets=("attn_implementation",)),
    rename("warmup_ratio", "warmup_steps", (ALMA, ORPO, SWIFT), "→ --warmup_steps (transformers 5 takes the ratio "
           "there: a value in [0, 1) is a share of the steps)", metavar="R"),
    ignored("use_fast_tokenizer", (ALMA,), "transformers 5 always loads the fast tokenizer"),
    ignored("low_cpu_mem_usage", (ALMA,), "transformers 5 no longer uses this option (weights load directly)"),
    ignored("ignore_pad_token_for_loss", (ALMA,), "padding never enters preftune's losses"),
    ignored("ignore_prompt_token_for_loss", (ALMA,), "preftune's losses score completion tokens only, never the prompt"),
    ignored("max_new_tokens", (ALMA,), "a generation length; `preftune train` does not generate "
            "(`preftune generate` and `preftune mt translate` take --max_new_tokens)"),
    ignored("overwrite_cache", (ALMA,), "preftune keeps no cache of tokenised data (it tokenises on every run)"),
    ignored("overwrite_output_dir", (ALMA,), "transformers 5 removed this flag"),
    ignored("do_train", (ALMA,), "`preftune train` always trains", noted=True),
    ignored("prediction_loss_only", (ALMA,), "preftune's evaluation computes losses and preference metrics only",
            noted=True),
)
_BY_FLAG = {a.flag: a for a in ALIASES}
_LATE = ("model_type", "rlhf_type")  # these read what the other aliases produced

# Flags that only one tool has: a command line with one of them is that tool's (and gets its defaults).
MARKERS = {
    SWIFT: ("rlhf_type", "sft_type", "train_type", "tuner_type", "model_type", "model_id_or_path", "val_dataset",
            "split_dataset_ratio", "dataset_test_ratio", "quantization_bit", "attn_impl", "use_flash_attn",
            "lora_dropout_p"),
    ORPO: ("train_file", "use_4bit", "use_8bit", "use_flash_attention", "lora_adapter_dir"),
    ALMA: ("cpo_data_path", "mmt_data_path", "ignore_prompt_token_for_loss", "ignore_pad_token_for_loss",
           "max_source_length", "use_flash_attention_2", "overwrite_cache"),
}


@dataclass
class AliasResult:
    """:func:`apply_aliases`' answer: ``defaults`` (tokens that go before the YAML config and the
    flags, so that both win), the translated ``argv``, the ``tools`` recognised and the log ``notes``."""

    defaults: list[str]
    argv: list[str]
    tools: list[str]
    notes: list[str]


def _items(argv: Sequence[str]) -> list[tuple[Optional[str], list[str]]]:
    """``["--a", "1", "--b=x", "--c"]`` → ``[("a", ["1"]), ("b", ["x"]), ("c", [])]`` (leading
    non-flag tokens under ``None``)."""
    items: list[tuple[Optional[str], list[str]]] = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            items.append((name, [value] if eq else []))
        elif items:
            items[-1][1].append(token)
        else:
            items.append((None, [token]))
    return items


def _active(alias: Alias, valid: set[str]) -> bool:
    """An alias applies when its name is not a preftune flag and what it produces is."""
    if alias.noted:
        return alias.flag in valid
    return alias.flag not in valid and all(t in valid for t in alias.targets)


def apply_aliases(argv: Sequence[str], valid: set[str], preset: Sequence[str] = ()) -> AliasResult:
    """Translate the foreign flags of ``argv`` into preftune's and add the recognised tool's defaults.

    Args:
        argv: the command line after the optional YAML path.
        valid: preftune's flag names (without ``--``) for the groups being parsed.
        preset: the YAML config as flag tokens: its keys count as given explicitly.

    Returns:
        An :class:`AliasResult`; its notes are also logged (logger ``preftune.aliases``), one line each.

    Raises:
        ConfigError: an alias with a value preftune cannot honour, or a command line that mixes the
            flags of two tools (their defaults differ).
    """
    items = _items(argv)
    explicit: dict[str, list[str]] = {}
    for name, values in _items(preset) + items:
        if name is not None and name in valid and not (name in _BY_FLAG and _BY_FLAG[name].noted):
            explicit[name] = values
    ctx = Context(valid=valid, explicit=explicit)
    flags = {name for name, _ in items if name is not None}
    tools = [tool for tool, markers in MARKERS.items()
             if any(m in flags and (m not in valid or m == "lora_adapter_dir") for m in markers)]
    if len(tools) > 1:
        found = {t: sorted(m for m in MARKERS[t] if m in flags) for t in tools}
        raise ConfigError("this command line mixes the flags of " + " and ".join(
            f"{t} (--{', --'.join(f)})" for t, f in found.items()) + "; their defaults differ, so use one tool's "
            "flags (or preftune's own)")
    ordered = sorted(items, key=lambda item: item[0] in _LATE)
    out: list[str] = []
    for name, values in ordered:
        alias = _BY_FLAG.get(name) if name is not None else None
        if alias is None or not _active(alias, valid):
            out += ([] if name is None else [f"--{name}"]) + values
            continue
        out += alias.convert(name, values, ctx)
    defaults: list[str] = []
    if tools:
        defaults = _tool_defaults(tools[0], flags, ctx)
    for note in ctx.notes:
        logger.info("alias: %s", note)
    return AliasResult(defaults, out, tools, ctx.notes)


def _swift_defaults(flags: set[str], ctx: Context) -> tuple[str, dict[str, str]]:
    """ms-swift's ``swift rlhf`` defaults (release :data:`SWIFT_DEFAULTS_RELEASE`, or
    :data:`SWIFT2_DEFAULTS_RELEASE` for a swift 2.x command line) where they differ from preftune's
    or matter for the loss: rlhf_type dpo; LoRA (rank 8, alpha 32, dropout 0.05; targets all-linear,
    swift 2.x DEFAULT); learning rate 1e-4 for LoRA / 1e-5 for full; batch size 1 and gradient
    accumulation up to 16 pairs per update (ceil(16 / batch / world size)); AdamW weight decay 0.1,
    beta2 0.95; cosine schedule; beta 0.1 (simpo 2.0); cpo_alpha 1.0 and simpo_gamma 1.0; DPO's
    rpo_alpha 1.0 in swift < 3.8, unset (no NLL term) since; swift 2.x: warmup 5 %, 1 epoch."""
    v2 = any(m in flags for m in SWIFT2_MARKERS)
    release = SWIFT2_DEFAULTS_RELEASE if v2 else SWIFT_DEFAULTS_RELEASE
    d: dict[str, str] = {"loss": "dpo", "use_peft": "true", "lora_r": "8", "lora_alpha": "32", "lora_dropout": "0.05",
                         "lora_target_modules": "DEFAULT" if v2 else "all-linear"}
    use_peft = ctx.value("use_peft", "true").lower() in _TRUE
    if not use_peft:  # full fine-tuning: the LoRA settings do not apply
        d = {"loss": "dpo"}
    d["learning_rate"] = "1e-4" if use_peft else "1e-5"
    d["per_device_train_batch_size"] = "1"
    d["per_device_eval_batch_size"] = ctx.value("per_device_train_batch_size", "1") if v2 else "1"
    batch = int(ctx.value("per_device_train_batch_size", "1"))
    world = _world_size()
    d["gradient_accumulation_steps"] = str(max(1, math.ceil(16 / max(batch, 1) / max(world, 1))))
    d.update(weight_decay="0.1", adam_beta2="0.95", lr_scheduler_type="cosine")
    if v2:
        d.update(warmup_steps="0.05", num_train_epochs="1")  # warmup ratio 0.05
    loss = ctx.value("loss", "dpo")
    d["beta"] = "2.0" if loss in ("simpo", "cpo-simpo") else "0.1"
    if loss in ("cpo", "simpo", "cpo-simpo"):
        d["cpo_alpha"] = "1.0"
    if loss in ("simpo", "cpo-simpo"):
        d["simpo_gamma"] = "1.0"
    if loss == "dpo" and v2:
        d["rpo_alpha"] = "1.0"
    return f"swift {release}", d


def _tool_defaults(tool: str, flags: set[str], ctx: Context) -> list[str]:
    if tool == SWIFT:
        release, defaults = _swift_defaults(flags, ctx)
    elif tool == ORPO:
        release, defaults = "the ORPO guide's train.py", dict(ORPO_SCRIPT_DEFAULTS)
        if ctx.given("eval_file"):
            defaults.pop("eval_ratio")
    else:
        release, defaults = "ALMA's run_cpo_llmmt.py", dict(ALMA_DEFAULTS)
    tokens: list[str] = []
    shown: list[str] = []
    for name, value in defaults.items():
        if name in ctx.valid and not ctx.given(name):
            tokens += [f"--{name}", value]
            shown.append(f"--{name} {value}")
    if tool == ORPO and not any(f in flags for f in ("use_flash_attention",)):
        tokens += flash_attention_tokens("use_flash_attention (the script's default true)", True, ctx)
    markers = sorted(m for m in MARKERS[tool] if m in flags)
    line = (f"{tool} command line (--{', --'.join(markers)}): {release} defaults instead of preftune's: "
            + (", ".join(shown) if shown else "none left to apply") + " (flags given win)")
    ctx.notes.append(line)
    return tokens


def add_help_group(parser: argparse.ArgumentParser, valid: set[str]) -> None:
    """List the aliases that apply to ``valid`` under their own ``--help`` heading (:data:`HELP_TITLE`).

    The arguments default to ``argparse.SUPPRESS``: they never reach the parsed groups, since
    :func:`apply_aliases` has translated them before parsing."""
    group = parser.add_argument_group(
        HELP_TITLE,
        "Flags of other tools, accepted as written; each translation is logged once. A command line with flags "
        f"that only ms-swift has gets `swift rlhf`'s defaults (ms-swift {SWIFT_DEFAULTS_RELEASE}; "
        f"{SWIFT2_DEFAULTS_RELEASE} for a swift 2.x command line with --sft_type): rlhf_type dpo, LoRA r 8 / "
        "alpha 32, learning rate 1e-4 (LoRA) or 1e-5 (full), batch 1 with gradient accumulation to 16, weight "
        "decay 0.1, adam_beta2 0.95, cosine schedule, beta 0.1 (simpo 2.0), cpo_alpha 1.0, simpo_gamma 1.0, and "
        "rpo_alpha 1.0 for DPO only in swift < 3.8 (unset since 3.8). Not followed: swift's max_length (preftune "
        "keeps --max_length / --max_prompt_length), gradient checkpointing, split ratio defaults. A command line "
        "of the ORPO guide's script (--train_file, --use_4bit, --use_flash_attention, --lora_adapter_dir) gets "
        "that script's defaults (--loss orpo, LoRA, eval_ratio 0.05, max_length 2048 / 1024); one of ALMA's "
        "run_cpo_llmmt.py gets --loss cpo (ALMA's --do_train and --prediction_loss_only are transformers flags, "
        "accepted and logged as having no effect). Flags given always win over these defaults, and preftune's "
        "own flag wins over an alias of it.")
    for alias in ALIASES:
        alias = _BY_FLAG[alias.flag]
        if alias.noted or not _active(alias, valid):
            continue
        group.add_argument(f"--{alias.flag}", nargs="?", default=argparse.SUPPRESS, metavar=alias.metavar or "V",
                           help=f"[{', '.join(alias.sources)}] {alias.help}")


def _world_size() -> int:
    """Processes of this launch (``$WORLD_SIZE``; 1 when not launched by torchrun / accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)
