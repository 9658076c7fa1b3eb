"""Flags of the ORPO guide's ``train.py`` ("ORPO训练指南", its parameter list) and that script's defaults."""

from __future__ import annotations

from .base import ORPO, Alias, flash, rename

# Defaults of the ORPO guide's script (its parameter list).
ORPO_SCRIPT_DEFAULTS = {"loss": "orpo", "use_peft": "true", "eval_ratio": "0.05", "beta": "0.1",
                        "max_length": "2048", "max_prompt_length": "1024", "lora_r": "16", "lora_alpha": "32",
                        "lora_dropout": "0.05"}

ORPO_ALIASES: tuple[Alias, ...] = (
    rename("train_file", "dataset", (ORPO,), "→ --dataset", metavar="FILE"),
    rename("use_4bit", "load_in_4bit", (ORPO,), "→ --load_in_4bit (QLoRA)", boolean=True, metavar="BOOL"),
    rename("use_8bit", "load_in_8bit", (ORPO,), "→ --load_in_8bit", boolean=True, metavar="BOOL"),
    Alias("use_flash_attention", (ORPO,), "true → --attn_implementation flash_attention_2 where the flash-attn package "
          "is installed, else one logged line and the default kernel", flash, "BOOL",
          targets=("attn_implementation",)),
)

# Flags that only this script has: a command line with one of them is its (and gets its defaults).
ORPO_MARKERS = ("train_file", "use_4bit", "use_8bit", "use_flash_attention", "lora_adapter_dir")
