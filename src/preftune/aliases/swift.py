"""Flags of ms-swift's ``swift rlhf`` (2.x, 3.x, 4.x) and its defaults.

Sources (read, not copied): ms-swift ``swift/arguments/rlhf_args.py``, ``sft_args.py``,
``tuner_args.py``, ``trainers/arguments.py`` (release 4.5.2) and ``swift/llm/utils/argument.py``
(release 2.6.1).
"""

from __future__ import annotations

import math

from preftune.errors import ConfigError
from preftune.losses import LOSS_NAMES
from preftune.losses.table import losses_reading, nll_weight_owners

from .base import (
    ALMA,
    SWIFT,
    TRUE,
    Alias,
    Context,
    as_bool,
    flash,
    flash_attention_tokens,
    ignored,
    mapping,
    one,
    rename,
)
from .deepspeed import ZERO_NAMES, convert_deepspeed

SWIFT_DEFAULTS_RELEASE = "4.5.2"  # `swift rlhf` defaults followed for a swift 3.x / 4.x command line
SWIFT2_DEFAULTS_RELEASE = "2.6.1"  # ... and for a swift 2.x one (flags that only swift 2.x has)
SWIFT2_MARKERS = ("sft_type", "model_id_or_path", "dataset_test_ratio", "lora_dropout_p", "use_flash_attn",
                  "eval_batch_size")

# swift's --rlhf_type names. Where preftune has a loss of the same name (the loss table), the name
# is that --loss (simpo is decided by cpo_alpha, see _rlhf_type); the others are refused.
SWIFT_RLHF_TYPES = ("dpo", "cpo", "orpo", "simpo", "rm", "kto", "ppo", "grpo", "gkd")
RLHF_TYPES = {name: name for name in SWIFT_RLHF_TYPES if name in LOSS_NAMES}
RLHF_UNSUPPORTED = tuple(name for name in SWIFT_RLHF_TYPES if name not in RLHF_TYPES)
TUNER_TYPES = {"lora": "true", "full": "false"}


def _model_type(name: str, given: list[str], ctx: Context) -> list[str]:
    value = " ".join(given)
    if ctx.given("model_name_or_path"):
        ctx.notes.append(f"--{name} {value}: ignored: preftune reads the architecture from the model's config.json")
        return []
    raise ConfigError(f"--{name} {value}: a model-registry key of ms-swift, which preftune cannot resolve "
                      "(offline, without swift); pass the model itself: --model PATH (a directory or Hub id; "
                      "same as --model_name_or_path)")


def _tuner(name: str, given: list[str], ctx: Context) -> list[str]:
    value = one(name, given)
    if value not in TUNER_TYPES:
        raise ConfigError(f"--{name} {value}: preftune trains LoRA adapters (lora) or all weights (full); "
                          f"{value} is not supported")
    return mapping(name, given, "use_peft", [TUNER_TYPES[value]], ctx)


def _quantization_bit(name: str, given: list[str], ctx: Context) -> list[str]:
    value = one(name, given)
    if value in ("0", "none", "None"):
        ctx.notes.append(f"--{name} {value}: no quantisation (the default)")
        return []
    if value not in ("4", "8"):
        raise ConfigError(f"--{name} {value}: preftune loads 4-bit or 8-bit base weights (bitsandbytes); "
                          "choose 4, 8 or 0")
    return mapping(name, given, f"load_in_{value}bit", ["true"], ctx)


def _attn_impl(name: str, given: list[str], ctx: Context) -> list[str]:
    value = one(name, given)
    kernel = {"flash_attn": "flash_attention_2", "flash_attention_3": "flash_attention_2"}.get(value, value)
    if kernel == "flash_attention_2":  # the default kernel, in one line, where flash-attn is not installed
        return flash_attention_tokens(f"{name} {value}", True, ctx)
    return mapping(name, given, "attn_implementation", [kernel], ctx)


def _freeze_aligner(name: str, given: list[str], ctx: Context) -> list[str]:
    frozen = as_bool(name, given)
    tower = ctx.value("freeze_vision_tower", "true").lower() in TRUE
    if frozen == tower:
        ctx.notes.append(f"--{name} {str(frozen).lower()}: the projector follows --freeze_vision_tower "
                         f"{str(tower).lower()} in preftune (frozen or trained together with the vision tower)")
        return []
    raise ConfigError(f"--{name} {str(frozen).lower()} with --freeze_vision_tower {str(tower).lower()}: preftune freezes "
                      "or trains the vision tower and its projector together; give both the same value")


def _freeze_llm(name: str, given: list[str], ctx: Context) -> list[str]:
    if as_bool(name, given):
        raise ConfigError(f"--{name} true: preftune always trains the language model (LoRA or all weights); drop it")
    ctx.notes.append(f"--{name} false: the language model is trained (preftune's only mode)")
    return []


def _truncation_strategy(name: str, given: list[str], ctx: Context) -> list[str]:
    value = one(name, given)
    if value == "delete":  # swift's default: a sample over --max_length is dropped
        ctx.notes.append(f"--{name} delete: preftune cuts an over-long pair's prompt from the start (--truncation_mode "
                         "keep_end) and its completions at the end, counted in the data report, instead of dropping it")
        return []
    modes = {"left": "keep_end", "right": "keep_start"}
    if value not in modes:
        raise ConfigError(f"--{name} {value!r}: preftune supports delete, left (--truncation_mode keep_end) and right "
                          "(keep_start)")
    return mapping(name, given, "truncation_mode", [modes[value]], ctx)


def _rlhf_type(name: str, given: list[str], ctx: Context) -> list[str]:
    value = one(name, given)
    if value in RLHF_UNSUPPORTED:
        what = {"ppo": "PPO (online RL: generation scored by a reward model)", "grpo": "GRPO (online RL: groups of "
                "generations scored by reward functions)", "gkd": "GKD (on-policy distillation from a teacher model)"}
        raise ConfigError(f"--{name} {value}: preftune does not train {what.get(value, value)}; it trains offline "
                          f"preference objectives: {', '.join(RLHF_TYPES)}")
    if value not in RLHF_TYPES:
        raise ConfigError(f"--{name} {value!r} is not valid; choose one of: {', '.join(RLHF_TYPES)}")
    loss = RLHF_TYPES[value]
    if value == "simpo":  # swift runs SimPO as TRL's CPO trainer, whose cpo_alpha (swift default 1.0) adds the NLL
        alpha = _explicit_float(ctx, "cpo_alpha", default=1.0)
        loss = "cpo-simpo" if alpha > 0 else "simpo"
    return mapping(name, given, "loss", [loss], ctx)


def _loss_type(name: str, given: list[str], ctx: Context) -> list[str]:
    """swift's (and TRL's) ``--loss_type a [b ...]``: the preference terms of the trainer ``--rlhf_type``
    picked. dpo: ``--dpo_loss_type a b ...`` (several: summed with ``--loss_weights``, swift's MPO);
    cpo: ``--cpo_loss_type a``; simpo / cpo-simpo: ``simpo`` only (swift's default there). Without
    ``--loss`` / ``--rlhf_type``, swift's default trainer, DPO."""
    if not given:
        raise ConfigError(f"--{name} needs a value")
    tokens = [] if ctx.given("loss") else mapping(name, given, "loss", ["dpo"], ctx)
    loss = ctx.value("loss", "dpo")
    if loss == "dpo":
        return tokens + mapping(name, given, "dpo_loss_type", list(given), ctx)
    if loss == "cpo":
        return mapping(name, given, "cpo_loss_type", [one(name, given)], ctx)
    if loss in ("simpo", "cpo-simpo") and given == ["simpo"]:
        ctx.notes.append(f"--{name} simpo: --loss {loss} already")
        return []
    raise ConfigError(f"--{name} {' '.join(given)} does not apply to --loss {loss}: swift's loss types are DPO's "
                      "(--rlhf_type dpo), CPO's (cpo) or simpo (simpo)")


def _rpo_alpha(name: str, given: list[str], ctx: Context) -> list[str]:
    """``--rpo_alpha 0`` (ms-swift's mpo.sh, beside an ``sft`` loss type) is no NLL term: left unset, so that
    it does not count as a second NLL weight; any other value is kept as given."""
    value = one(name, given)
    try:
        zero = float(value) == 0.0
    except ValueError:
        zero = False
    ctx.produced[name] = (name, [value])  # given: no tool default replaces it
    if not zero:
        return [f"--{name}", value]
    ctx.notes.append(f"--{name} {value}: no RPO NLL term (left unset)")
    return []


def _explicit_float(ctx: Context, name: str, default: float) -> float:
    if name not in ctx.explicit:
        return default
    try:
        return float(one(name, ctx.explicit[name]))
    except ValueError as err:
        raise ConfigError(f"--{name} {' '.join(ctx.explicit[name])}: expected a number") from err


SWIFT_ALIASES: tuple[Alias, ...] = (
    Alias("rlhf_type", (SWIFT,), f"{', '.join(RLHF_TYPES)} → --loss (simpo with --cpo_alpha > 0, swift's default "
          "1.0, is cpo-simpo, as in swift)", _rlhf_type, "{" + ",".join(RLHF_TYPES) + "}", targets=("loss",)),
    Alias("loss_type", (SWIFT,), "dpo: → --dpo_loss_type (several, with --loss_weights: MPO), cpo: → --cpo_loss_type; "
          "without --rlhf_type: DPO's", _loss_type, "TYPE", targets=("dpo_loss_type", "cpo_loss_type")),
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
    Alias("freeze_aligner", (SWIFT,), "the vision projector: frozen / trained with --freeze_vision_tower (the same "
          "value; preftune does both together)", _freeze_aligner, "BOOL"),
    Alias("freeze_llm", (SWIFT,), "false only: preftune always trains the language model", _freeze_llm, "BOOL"),
    rename("freeze_vit", "freeze_vision_tower", (SWIFT,), "→ --freeze_vision_tower", boolean=True, metavar="BOOL"),
    rename("packing", "padding_free", (SWIFT,), "→ --padding_free (pairs packed into rows without padding; preftune's "
           "default)", boolean=True, metavar="BOOL"),
    Alias("truncation_strategy", (SWIFT,), "left → --truncation_mode keep_end, right → keep_start; delete (swift's "
          "default): logged, preftune truncates instead", _truncation_strategy, "{delete,left,right}",
          targets=("truncation_mode",)),
    Alias("deepspeed", (SWIFT,), f"{', '.join(ZERO_NAMES)}: ms-swift's DeepSpeed configurations, written by preftune "
          "(without the deepspeed package: one line, trained without it); a file is used as given", convert_deepspeed,
          noted=True),
    Alias("rpo_alpha", (SWIFT,), "0: no NLL term (unset)", _rpo_alpha, noted=True),
    ignored("load_from_cache_file", (SWIFT,), "preftune keeps no cache of tokenised data (it tokenises on every run)"),
    ignored("dataset_num_proc", (SWIFT,), "preftune tokenises in the training process"),
    ignored("lazy_tokenize", (SWIFT,), "preftune tokenises the whole data set before training"),
    ignored("dataset_shuffle", (SWIFT,), "the training sampler shuffles every epoch (seeded by --seed)"),
    ignored("use_hf", (SWIFT,), "preftune reads local files and the Hugging Face Hub only"),
    Alias("use_flash_attn", (SWIFT,), "swift 2.x: as --use_flash_attention", flash, "BOOL",
          targets=("attn_implementation",)),
    Alias("quantization_bit", (SWIFT,), "4 → --load_in_4bit true, 8 → --load_in_8bit true (bitsandbytes)",
          _quantization_bit, "{0,4,8}", targets=("load_in_4bit", "load_in_8bit")),
)

# Flags that only swift has: a command line with one of them is swift's (and gets its defaults).
SWIFT_MARKERS = ("rlhf_type", "sft_type", "train_type", "tuner_type", "model_type", "model_id_or_path", "val_dataset",
                 "split_dataset_ratio", "dataset_test_ratio", "quantization_bit", "attn_impl", "use_flash_attn",
                 "lora_dropout_p", "load_from_cache_file", "dataset_num_proc", "freeze_vit", "freeze_aligner", "freeze_llm",
                 "truncation_strategy", "lazy_tokenize", "use_hf")


def swift_defaults(flags: set[str], ctx: Context, world: int) -> tuple[str, dict[str, str]]:
    """ms-swift's ``swift rlhf`` defaults (release :data:`SWIFT_DEFAULTS_RELEASE`, or
    :data:`SWIFT2_DEFAULTS_RELEASE` for a swift 2.x command line) where they differ from preftune's
    or matter for the loss: rlhf_type dpo; LoRA (rank 8, alpha 32, dropout 0.05; targets all-linear,
    swift 2.x DEFAULT); learning rate 1e-4 for LoRA / 1e-5 for full; batch size 1 and gradient
    accumulation up to 16 pairs per update (ceil(16 / batch / ``world`` processes)); AdamW weight
    decay 0.1, beta2 0.95; cosine schedule; beta 0.1 (simpo 2.0); cpo_alpha 1.0 and simpo_gamma 1.0
    (for the losses that read them, per the loss table); DPO's rpo_alpha 1.0 in swift < 3.8, unset
    (no NLL term) since; swift 2.x: warmup 5 %, 1 epoch.

    Returns:
        ``("swift <release>", {flag: value})``.
    """
    v2 = any(m in flags for m in SWIFT2_MARKERS)
    release = SWIFT2_DEFAULTS_RELEASE if v2 else SWIFT_DEFAULTS_RELEASE
    d: dict[str, str] = {"loss": "dpo", "use_peft": "true", "lora_r": "8", "lora_alpha": "32", "lora_dropout": "0.05",
                         "lora_target_modules": "DEFAULT" if v2 else "all-linear"}
    use_peft = ctx.value("use_peft", "true").lower() in TRUE
    if not use_peft:  # full fine-tuning: the LoRA settings do not apply
        d = {"loss": "dpo"}
    d["learning_rate"] = "1e-4" if use_peft else "1e-5"
    d["per_device_train_batch_size"] = "1"
    d["per_device_eval_batch_size"] = ctx.value("per_device_train_batch_size", "1") if v2 else "1"
    batch = int(ctx.value("per_device_train_batch_size", "1"))
    d["gradient_accumulation_steps"] = str(max(1, math.ceil(16 / max(batch, 1) / max(world, 1))))
    d.update(weight_decay="0.1", adam_beta2="0.95", lr_scheduler_type="cosine")
    if v2:
        d.update(warmup_steps="0.05", num_train_epochs="1")  # warmup ratio 0.05
    loss = ctx.value("loss", "dpo")
    if loss in losses_reading("beta"):  # rm has no temperature (its loss refuses one)
        d["beta"] = "2.0" if loss in ("simpo", "cpo-simpo") else "0.1"
    owners = nll_weight_owners()
    if loss in owners["cpo_alpha"]:
        d["cpo_alpha"] = "1.0"
    if loss in losses_reading("simpo_gamma"):
        d["simpo_gamma"] = "1.0"
    if loss in owners["rpo_alpha"] and v2:
        d["rpo_alpha"] = "1.0"
    return f"swift {release}", d
