"""The pieces every alias is built from: :class:`Context` (what an alias sees), :class:`Alias`
(one foreign flag), :func:`rename` and :func:`ignored` (the two common kinds), the value readers
and the flash-attention translation shared by ms-swift, the ORPO script and ALMA.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from preftune.errors import ConfigError


def value_argv(key: str, value: object) -> list[str]:
    """One YAML ``key: value`` as command-line words: booleans as ``true`` / ``false``, lists as several
    words, a dict as JSON, and a value starting with ``-`` as ``--key=value`` (so ``-inf`` is not taken
    for a flag; issue 25)."""
    if isinstance(value, bool):
        return [f"--{key}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *map(str, value)]
    if isinstance(value, dict):
        import json

        return [f"--{key}", json.dumps(value)]
    return [f"--{key}={value}"] if str(value).startswith("-") else [f"--{key}", str(value)]

SWIFT, ORPO, ALMA = "ms-swift", "ORPO script", "ALMA"

TRUE, FALSE = ("true", "1", "yes", "y", "t", "on"), ("false", "0", "no", "n", "f", "off")


@dataclass
class Context:
    """What the aliases see: the real flag names, the flags given explicitly (real names; YAML keys
    included) with their values, and the log lines of this translation."""

    valid: set[str]
    explicit: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)
    produced: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # flag -> (alias, its values)

    def given(self, name: str) -> bool:
        """``--name`` was given explicitly or produced by an alias."""
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


def as_bool(flag: str, values: list[str]) -> bool:
    """A boolean flag's values (none: true). Raises ConfigError: not one true / false word."""
    if not values:
        return True
    if len(values) == 1 and values[0].lower() in TRUE + FALSE:
        return values[0].lower() in TRUE
    raise ConfigError(f"--{flag} {' '.join(values)}: expected true or false")


def one(flag: str, values: list[str]) -> str:
    """The single value of ``--flag``. Raises ConfigError: none or several."""
    if len(values) != 1:
        raise ConfigError(f"--{flag} takes one value, got {len(values)}" + (f": {' '.join(values)}" if values else ""))
    return values[0]


def mapping(alias: str, values: list[str], target: str, new_values: list[str], ctx: Context) -> list[str]:
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
            new = ["true" if as_bool(name, given) else "false"]
        elif values is not None:
            value = one(name, given)
            if value not in values:
                raise ConfigError(f"--{name} {value!r} is not supported; choose one of: {', '.join(values)}")
            new = [values[value]]
        else:
            if not given:
                raise ConfigError(f"--{name} needs a value")
            new = list(given)
        return mapping(name, given, target, new, ctx)

    return Alias(flag, sources, help, convert, metavar, targets=(target,))


def ignored(flag: str, sources: tuple[str, ...], why: str, *, noted: bool = False) -> Alias:
    """``--flag [V]`` has no effect in preftune: accepted and logged with ``why``."""

    def convert(name: str, given: list[str], ctx: Context) -> list[str]:
        shown = f"--{name}" + (f" {' '.join(given)}" if given else "")
        ctx.notes.append(f"{shown}: ignored: {why}")
        return [f"--{name}", *given] if noted else []

    return Alias(flag, sources, f"accepted, no effect: {why}", convert, noted=noted)


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
    return mapping(name, ["true"], "attn_implementation", ["flash_attention_2"], ctx)


def flash(name: str, given: list[str], ctx: Context) -> list[str]:
    """Converter of the boolean flash-attention flags (``--use_flash_attention`` and its kin)."""
    return flash_attention_tokens(name, as_bool(name, given), ctx)
