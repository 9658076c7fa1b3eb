"""What LLaMA-Factory's two config formats share when read by preftune: :class:`Door` (the flags a
config becomes, with one log line per translation) and :class:`LossPlan` (LLaMA-Factory's
preference settings → preftune's loss flags, per ``LLaMA-Factory src/llamafactory/train/dpo/trainer.py``
and ``train/kto``, read, not copied)."""

from __future__ import annotations

import difflib
import json
import math
from typing import Any, Optional, Union

from preftune.errors import ConfigError

from .base import TRUE, Context, flash_attention_tokens
from .deepspeed import ZERO_NAMES, deepspeed_available, write_zero_config

DPO_TYPES = ("sigmoid", "hinge", "ipo")  # LLaMA-Factory's pref_loss values that are DPO with a reference


def lf_bool(value: Any) -> str:
    """A YAML boolean (or its spelling) as ``"true"`` / ``"false"``."""
    return "true" if (value if isinstance(value, bool) else str(value).lower() in TRUE) else "false"


def number(source: str, key: str, value: Any) -> float:
    """``value`` as a finite number. Raises ConfigError naming ``source`` and ``key``."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} {value!r}: expected a number") from None
    if not math.isfinite(out):
        raise ConfigError(f"{source}: {key} {value!r}: expected a finite number")
    return out


def _tokens(value: Any) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return [json.dumps(value)]
    return [str(value)]


class Door:
    """The preftune flags one foreign config becomes: ``settings`` (flag → values, in order), the log
    ``notes`` (one per translation), the tool and the config's path; ``cli`` are the flags given on
    the command line (they win over the config)."""

    def __init__(self, tool: str, source: str, valid: set[str], cli: set[str]):
        self.tool, self.source, self.valid, self.cli = tool, source, valid, cli
        self.settings: dict[str, list[str]] = {}
        self.notes: list[str] = []

    def cli_gives(self, flag: str) -> bool:
        """``--flag`` (or an alias of it: ``--model`` for the model) is on the command line."""
        return flag in self.cli or (flag == "model_name_or_path" and "model" in self.cli)

    def set(self, flag: str, value: Union[str, list[str]], why: str) -> None:
        """``--flag value`` from ``why`` (a key, or a default), logged once."""
        if flag not in self.valid:
            raise ConfigError(f"{self.source}: {why}: this preftune has no --{flag}")
        values = value if isinstance(value, list) else [value]
        self.settings[flag] = values
        self.notes.append(f"{why} → --{flag} {' '.join(values)}")

    def keep(self, key: str, value: Any) -> None:
        """A key that is preftune's flag of the same meaning."""
        if value is not None:
            self.settings[key] = _tokens(value)

    def rename(self, key: str, value: Any, flag: str) -> None:
        """``key: value`` means ``--flag value``."""
        if value is not None:
            self.set(flag, _tokens(value), f"{key} {' '.join(_tokens(value))}")

    def ignore(self, key: str, value: Any, why: str) -> None:
        """A key with no effect here: logged."""
        self.notes.append(f"{key} {' '.join(_tokens(value))}: ignored: {why}")

    def refuse_if_set(self, key: str, value: Any, what: str) -> None:
        """A key preftune cannot honour: refused unless it holds its off value (None, false, 0, empty)."""
        if value in (None, False, 0, "", [], {}) or str(value).lower() in ("false", "none", "null"):
            self.notes.append(f"{key} {value}: off, as preftune")
            return
        raise ConfigError(f"{self.source}: {key}: {value!r}: {what} is not supported by preftune; remove the key")

    def unknown(self, key: str, names: list[str]) -> None:
        """Raises ConfigError: ``key`` is neither the tool's nor preftune's (with the closest name)."""
        hint = difflib.get_close_matches(key, names, n=1)
        raise ConfigError(f"{self.source}: unknown key {key!r} in this {self.tool} config"
                          + (f"; did you mean {hint[0]!r}?" if hint else ""))

    def require_model(self, value: Any, key: str) -> None:
        """A config that names no model is refused (never the default model, silently)."""
        if value is None and not self.cli_gives("model_name_or_path"):
            raise ConfigError(f"{self.source}: this {self.tool} config names no model ({key}); give {key}: PATH "
                              "(or --model_name_or_path PATH)")
        if value is not None:
            self.settings["model_name_or_path"] = [str(value)]

    def attention(self, value: str, key: str = "flash_attn") -> None:
        """LLaMA-Factory's ``flash_attn``: auto / sdpa, disabled / eager, fa2 / fa3 (flash-attn, where installed)."""
        kernels = {"auto": "sdpa", "sdpa": "sdpa", "disabled": "eager", "eager": "eager"}
        if value in kernels:
            self.set("attn_implementation", kernels[value], f"{key} {value}")
            return
        if value not in ("fa2", "fa3", "flash_attention_2", "flash_attention_3"):
            raise ConfigError(f"{self.source}: {key} {value!r}: choose auto, sdpa, disabled, eager, fa2 or fa3")
        ctx = Context(valid=self.valid, explicit={})
        tokens = flash_attention_tokens(f"{key} {value}", True, ctx)
        self.notes += ctx.notes
        if tokens:
            self.settings["attn_implementation"] = tokens[1:]

    def deepspeed(self, value: Any) -> None:
        """A DeepSpeed config (a file, or ms-swift's zero names): passed on where the package is installed;
        refused otherwise (the config asks for it)."""
        if not deepspeed_available():
            raise ConfigError(f"{self.source}: deepspeed {value}: the deepspeed package is not installed here; "
                              "pip install deepspeed, or remove the key to train without it")
        path = write_zero_config(str(value)) if str(value) in ZERO_NAMES else str(value)
        self.set("deepspeed", path, f"deepspeed {value}")

    def datasets(self, flag: str, resolved: list) -> None:
        """Data sets resolved through ``dataset_info.json`` → ``--dataset`` / ``--eval_file`` (+ their formats)."""
        self.settings[flag] = [r.spec for r in resolved]
        self.notes += [r.note for r in resolved]
        if flag == "dataset":
            self.settings["dataset_format"] = [r.format for r in resolved]

    def tokens(self) -> list[str]:
        """The settings as command-line tokens."""
        out: list[str] = []
        for flag, values in self.settings.items():
            out += [f"--{flag}", *values]
        return out


class LossPlan:
    """LLaMA-Factory's ``stage`` and preference keys → ``--loss`` and its hyper-parameters.

    dpo: ``pref_loss`` sigmoid / hinge / ipo → ``--loss dpo --dpo_loss_type X``, ``pref_ftx`` →
    ``--rpo_alpha`` (the chosen NLL), ``pref_bco_weight`` w → ``--dpo_loss_type X bco_pair
    --loss_weights 1/(1+w) w/(1+w)`` (LLaMA-Factory's re-weighting), ``dpo_label_smoothing``,
    ``ld_alpha``; orpo → ``--loss orpo`` (``pref_beta`` is ORPO's lambda); simpo → ``--loss simpo``
    with ``pref_beta`` (LLaMA-Factory's default 0.1, not preftune's 2.0), ``simpo_gamma`` and
    ``pref_ftx`` as ``--cpo_alpha``. kto: ``--loss kto``, ``kto_chosen_weight`` / ``kto_rejected_weight``
    → ``--desirable_weight`` / ``--undesirable_weight``. rm: ``--loss rm`` (no temperature).
    """

    def __init__(self, door: Door, stage: str, default_loss: str = "sigmoid"):
        self.door, self.stage, self.default_loss = door, stage, default_loss

    def _num(self, given: dict, key: str, default: Optional[float]) -> Optional[float]:
        return number(self.door.source, key, given[key]) if given.get(key) is not None else default

    def apply(self, given: dict) -> None:
        """Set the loss flags from the preference keys ``given`` (only those present in the config).
        Raises ConfigError for a value preftune cannot honour (a pref_ftx for ORPO / KTO, kto_pair ...)."""
        door, source = self.door, self.door.source
        pref = str(given.get("pref_loss", self.default_loss))
        beta, ftx = self._num(given, "pref_beta", 0.1), self._num(given, "pref_ftx", 0.0)
        bco, smoothing = self._num(given, "pref_bco_weight", 0.0), self._num(given, "dpo_label_smoothing", 0.0)
        if door.cli_gives("loss"):
            door.notes.append(f"stage {self.stage} / pref_loss {pref}: not used, --loss is given on the command line")
            return
        if self.stage == "rm":
            door.set("loss", "rm", "stage rm")
            for key in ("pref_loss", "pref_beta", "pref_ftx", "simpo_gamma"):
                if key in given:
                    door.ignore(key, given[key], "stage rm trains a Bradley-Terry reward model (no temperature)")
            return
        if self.stage == "kto":
            door.set("loss", "kto", "stage kto")
            door.set("beta", str(beta), "pref_beta" if "pref_beta" in given else "pref_beta (LLaMA-Factory default)")
            for key, flag in (("kto_chosen_weight", "desirable_weight"), ("kto_rejected_weight", "undesirable_weight")):
                if key in given:
                    door.set(flag, str(self._num(given, key, 1.0)), key)
            if ftx:
                raise ConfigError(f"{source}: pref_ftx {ftx} with stage kto: preftune's KTO has no SFT term; remove it")
            return
        for key in ("kto_chosen_weight", "kto_rejected_weight"):
            if key in given:
                door.ignore(key, given[key], "stage kto only")
        if pref in DPO_TYPES:
            door.set("loss", "dpo", f"stage dpo, pref_loss {pref}")
            if bco:
                door.set("dpo_loss_type", [pref, "bco_pair"], f"pref_loss {pref} + pref_bco_weight {bco}")
                door.set("loss_weights", [str(1 / (1 + bco)), str(bco / (1 + bco))], "pref_bco_weight (re-weighted)")
            else:
                door.set("dpo_loss_type", pref, f"pref_loss {pref}")
            if ftx:
                door.set("rpo_alpha", str(ftx), "pref_ftx")
            if smoothing:
                door.set("label_smoothing", str(smoothing), "dpo_label_smoothing")
            if given.get("ld_alpha") is not None:
                door.set("ld_alpha", str(self._num(given, "ld_alpha", None)), "ld_alpha (LD-DPO)")
        elif pref in ("orpo", "simpo"):
            door.set("loss", pref, f"stage dpo, pref_loss {pref}")
            for key, value in (("pref_bco_weight", bco), ("dpo_label_smoothing", smoothing)):
                if value:
                    raise ConfigError(f"{source}: {key} {value} with pref_loss {pref}: applies to sigmoid / hinge / ipo")
            if pref == "orpo" and ftx:
                raise ConfigError(f"{source}: pref_ftx {ftx} with pref_loss orpo: ORPO's loss holds its NLL term "
                                  "already; remove pref_ftx")
            if pref == "simpo":
                door.set("simpo_gamma", str(self._num(given, "simpo_gamma", 0.5)), "simpo_gamma")
                door.set("cpo_alpha", str(ftx), "pref_ftx (SimPO's NLL weight)")
            if given.get("ld_alpha") is not None:
                door.ignore("ld_alpha", given["ld_alpha"], "LD-DPO applies to the DPO losses")
        else:
            raise ConfigError(f"{source}: pref_loss {pref!r}: preftune trains sigmoid, hinge, ipo, orpo and simpo "
                              "(kto_pair: use stage kto)")
        door.set("beta", str(beta), "pref_beta" if "pref_beta" in given else "pref_beta (LLaMA-Factory default 0.1)")
        if self.stage == "dpo" and pref not in ("simpo",) and "simpo_gamma" in given:
            door.ignore("simpo_gamma", given["simpo_gamma"], "pref_loss simpo only")
