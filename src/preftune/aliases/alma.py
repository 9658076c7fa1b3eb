"""Flags of ALMA's ``run_cpo_llmmt.py`` (``runs/cpo_ft.sh``; github.com/fe1ixxu/ALMA,
``utils/arguments.py``) and its defaults."""

from __future__ import annotations

from .base import ALMA, ORPO, SWIFT, Alias, flash, ignored, rename

ALMA_DEFAULTS = {"loss": "cpo"}  # run_cpo_llmmt.py trains TRL's CPOTrainer (CPOConfig's defaults otherwise)

ALMA_ALIASES: tuple[Alias, ...] = (
    rename("cpo_data_path", "dataset", (ALMA,), "→ --dataset (ALMA-R triplets)", metavar="PATH"),
    rename("mmt_data_path", "dataset", (ALMA,), "→ --dataset", metavar="PATH"),
    rename("tokenizer_name", "tokenizer_name_or_path", (ALMA,), "→ --tokenizer_name_or_path", metavar="PATH"),
    rename("evaluation_strategy", "eval_strategy", (ALMA,), "→ --eval_strategy (the name before transformers 4.46)",
           metavar="STRATEGY"),
    rename("max_source_length", "max_prompt_length", (ALMA,), "→ --max_prompt_length (an explicit "
           "--max_prompt_length wins)", metavar="N"),
    Alias("use_flash_attention_2", (ALMA,), "as --use_flash_attention", flash, "BOOL",
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

# Flags that only ALMA has: a command line with one of them is ALMA's (and gets its defaults).
ALMA_MARKERS = ("cpo_data_path", "mmt_data_path", "ignore_prompt_token_for_loss", "ignore_pad_token_for_loss",
                "max_source_length", "use_flash_attention_2", "overwrite_cache")
