"""Flags that users bring from ms-swift, ORPO training scripts and ALMA, accepted as aliases.

A command line copied from ``swift rlhf``, the ORPO guide's ``train.py`` or ALMA's
``runs/cpo_ft.sh`` runs with ``preftune train`` as written. :func:`apply_aliases` rewrites such a
command line into preftune's own flags before it is parsed (:func:`preftune.cli_args.parse_groups`):

* an alias becomes the preftune flag it means (``--sft_type lora`` → ``--use_peft true``); each
  translation is logged once;
* a flag that has no effect in preftune is accepted with a logged ``ignored: why`` line, never
  silently;
* a flag that cannot be honoured (``--model_type NAME`` without a model path, ``--rlhf_type kto``)
  is a :class:`~preftune.errors.ConfigError`;
* a command line recognised as one tool's (by flags only that tool has) gets that tool's defaults
  instead of preftune's (:data:`SWIFT_DEFAULTS_RELEASE`, :data:`ORPO_SCRIPT_DEFAULTS`,
  :data:`ALMA_DEFAULTS`), announced in one log line. Flags given on the command line or in the
  YAML file always win over these defaults, and preftune's own flag wins over an alias of it.

An alias applies only while its name is not one of preftune's flags: when a later preftune
version gives a name a meaning of its own, that meaning wins. ``--help`` lists the aliases in
their own group (:func:`add_help_group`).

One module per tool: :mod:`~preftune.aliases.swift` (ms-swift), :mod:`~preftune.aliases.orpo_script`
(the ORPO guide's script), :mod:`~preftune.aliases.alma` (ALMA); :mod:`~preftune.aliases.base` holds
what they share. Sources (read, not copied): ms-swift ``swift/arguments/rlhf_args.py``,
``sft_args.py``, ``tuner_args.py``, ``trainers/arguments.py`` (release 4.5.2) and
``swift/llm/utils/argument.py`` (release 2.6.1); the ORPO guide ("ORPO训练指南", its parameter
list); ALMA ``utils/arguments.py``, ``run_cpo_llmmt.py`` and ``runs/cpo_ft.sh`` (github.com/fe1ixxu/ALMA).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from preftune.errors import ConfigError

from .alma import ALMA_ALIASES, ALMA_DEFAULTS, ALMA_MARKERS
from .base import ALMA, ORPO, SWIFT, Alias, Context, flash_attention_tokens, value_argv
from .dataset_info import resolve
from .lf_v1 import is_v1, translate_v1
from .llamafactory import KNOWN as LLAMAFACTORY_KEYS
from .llamafactory import is_classic, translate_classic
from .orpo_script import ORPO_ALIASES, ORPO_MARKERS, ORPO_SCRIPT_DEFAULTS
from .swift import (
    RLHF_TYPES,
    RLHF_UNSUPPORTED,
    SWIFT2_DEFAULTS_RELEASE,
    SWIFT_ALIASES,
    SWIFT_DEFAULTS_RELEASE,
    SWIFT_MARKERS,
    swift_defaults,
)

__all__ = [
    "ALIASES", "ALMA_DEFAULTS", "HELP_TITLE", "MARKERS", "ORPO_SCRIPT_DEFAULTS", "RLHF_TYPES", "RLHF_UNSUPPORTED",
    "SWIFT2_DEFAULTS_RELEASE", "SWIFT_DEFAULTS_RELEASE", "Alias", "AliasResult", "Context", "add_help_group",
    "apply_aliases", "suggestion", "translate_yaml",
]

logger = logging.getLogger("preftune.aliases")

HELP_TITLE = "aliases from ms-swift / ORPO scripts / ALMA"

ALIASES: tuple[Alias, ...] = (*SWIFT_ALIASES, *ORPO_ALIASES, *ALMA_ALIASES)
_BY_FLAG = {a.flag: a for a in ALIASES}
_LATE = ("model_type", "rlhf_type", "loss_type")  # these read what the other aliases produced, in this order

# Flags that only one tool has: a command line with one of them is that tool's (and gets its defaults).
MARKERS = {SWIFT: SWIFT_MARKERS, ORPO: ORPO_MARKERS, ALMA: ALMA_MARKERS}


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
    notes: list[str] = []
    items = _dataset_dir(_items(argv), notes)
    explicit: dict[str, list[str]] = {}
    for name, values in _items(preset) + items:
        if name is not None and name in valid and not (name in _BY_FLAG and _BY_FLAG[name].noted):
            explicit[name] = values
    ctx = Context(valid=valid, explicit=explicit, notes=notes)
    flags = {name for name, _ in items if name is not None}
    tools = [tool for tool, markers in MARKERS.items()
             if any(m in flags and (m not in valid or m == "lora_adapter_dir") for m in markers)]
    if len(tools) > 1:
        found = {t: sorted(m for m in MARKERS[t] if m in flags) for t in tools}
        raise ConfigError("this command line mixes the flags of " + " and ".join(
            f"{t} (--{', --'.join(f)})" for t, f in found.items()) + "; their defaults differ, so use one tool's "
            "flags (or preftune's own)")
    # an alias given twice (in the YAML, then on the command line): the last one counts, as for preftune's flags
    last = {name: i for i, (name, _) in enumerate(items) if name in _BY_FLAG}
    items = [item for i, item in enumerate(items) if item[0] not in last or last[item[0]] == i]
    ordered = sorted(items, key=lambda item: _LATE.index(item[0]) + 1 if item[0] in _LATE else 0)
    out: list[str] = []
    for name, values in ordered:
        alias = _BY_FLAG.get(name) if name is not None else None
        if alias is None or not _active(alias, valid):
            if name is not None and len(values) == 1 and values[0].startswith("-"):
                out.append(f"--{name}={values[0]}")  # `--key=-inf`: a value starting with '-' is not a flag
            else:
                out += ([] if name is None else [f"--{name}"]) + values
            continue
        out += alias.convert(name, values, ctx)
    defaults: list[str] = []
    if tools:
        defaults = _tool_defaults(tools[0], flags, ctx)
    for note in ctx.notes:
        logger.info("alias: %s", note)
    return AliasResult(defaults, out, tools, ctx.notes)


def _dataset_dir(items: list, notes: list[str]) -> list:
    """``--dataset_dir DIR`` (LLaMA-Factory's): the ``--dataset`` / ``--eval_file`` values that are not files
    are names of ``DIR/dataset_info.json`` entries (``NAME#N`` too), resolved as in a LLaMA-Factory config."""
    dirs = [values for name, values in items if name == "dataset_dir"]
    if not dirs:
        return items
    if len(dirs[-1]) != 1:
        raise ConfigError(f"--dataset_dir takes one folder, got {len(dirs[-1])}")
    dataset_dir = dirs[-1][0]
    out = []
    for name, values in items:
        if name == "dataset_dir":
            continue
        if name in ("dataset", "eval_file"):
            resolved = []
            for value in values:
                path, _, count = value.partition("#")
                if os.path.exists(path):
                    resolved.append(value)
                    continue
                entry = resolve([path], dataset_dir, "--dataset_dir", "this", int(count) if count.isdigit() else None)
                notes.append(f"--{name} {value}: {entry[0].note}")
                resolved.append(entry[0].spec)
            values = resolved
        out.append((name, values))
    return out


def suggestion(name: str, valid: set[str], yaml: bool = False) -> Optional[str]:
    """The closest known name to an unknown flag / YAML key ``name``: preftune's flags, the aliases that
    apply, and for a YAML key LLaMA-Factory's keys too (``lora_rank`` is an alias of ``--lora_r``, never
    "did you mean local_rank")."""
    import difflib

    names = set(valid) | {a.flag for a in ALIASES if _active(a, valid)}
    if yaml:
        names |= LLAMAFACTORY_KEYS
    hint = difflib.get_close_matches(name, sorted(names), n=1)
    return hint[0] if hint else None


def translate_yaml(config: dict, source: str, valid: set[str], cli: set[str]) -> list[str]:
    """A YAML config → flag tokens (they go before the command line's, which win).

    A LLaMA-Factory config (v1 format: ``model`` with ``model_class`` / ``peft_config`` /
    ``train_dataset`` ...; classic: ``stage``, ``finetuning_type``, ``pref_beta`` ...) is translated with
    LLaMA-Factory's defaults (:mod:`~preftune.aliases.llamafactory`, :mod:`~preftune.aliases.lf_v1`), one
    log line per translation; any other YAML takes preftune's flags and the aliases of the command
    line (translated later by :func:`apply_aliases`, as on the command line). ``cli``: the flag names
    given on the command line.

    Raises:
        ConfigError: an unknown key (with the closest known name), or a LLaMA-Factory key or stage
            preftune cannot honour.
    """
    door = None
    if is_v1(config, valid):
        door = translate_v1(config, source, valid, cli)
    elif is_classic(config, valid):
        door = translate_classic(config, source, valid, cli)
    if door is not None:
        for note in door.notes:
            logger.info("%s: %s", door.tool, note)
        logger.info("%s config %s: read with %s's defaults where it leaves a setting out (flags given win)",
                    door.tool, source, door.tool)
        return door.tokens()
    known = {a.flag for a in ALIASES if _active(a, valid) or a.noted}
    argv: list[str] = []
    for key, value in config.items():
        if key not in valid and key not in known:
            hint = suggestion(str(key), valid, yaml=True)
            raise ConfigError(f"{source}: unknown key {key!r}" + (f"; did you mean {hint!r}?" if hint else ""))
        if value is not None:
            argv += value_argv(key, value)
    return argv


def _tool_defaults(tool: str, flags: set[str], ctx: Context) -> list[str]:
    if tool == SWIFT:
        release, defaults = swift_defaults(flags, ctx, _world_size())
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
