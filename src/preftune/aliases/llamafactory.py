"""LLaMA-Factory's training configs (the classic ``llamafactory-cli train x.yaml`` format), read as written.

A YAML file with keys only LLaMA-Factory has (:data:`MARKERS`: ``stage``, ``finetuning_type``,
``pref_beta``, ``cutoff_len``, ``dataset_dir`` ...) is LLaMA-Factory's: :func:`translate_classic`
turns it into preftune flags with LLaMA-Factory's defaults (``src/llamafactory/hparams/*.py``, read,
not copied): LoRA rank 8, alpha 2 x rank, dropout 0, every linear layer; ``cutoff_len`` 2048;
``pref_beta`` 0.1 (SimPO too), ``simpo_gamma`` 0.5; transformers' learning rate 5e-5 and logging
every 500 steps. Each key is translated, logged as having no effect, or refused in one line
(:class:`~preftune.errors.ConfigError`); the data sets are resolved through ``dataset_info.json``
(:mod:`~preftune.aliases.dataset_info`). Stages: ``dpo`` (``pref_loss`` sigmoid / hinge / ipo →
``--loss dpo``, orpo → ``orpo``, simpo → ``simpo``), ``kto`` and ``rm``; ``sft``, ``pt`` and ``ppo`` are
refused.
"""

from __future__ import annotations

from preftune.errors import ConfigError

from .dataset_info import resolve
from .lf_common import Door, LossPlan, lf_bool, number

LLAMAFACTORY = "LLaMA-Factory"
MARKERS = ("stage", "finetuning_type", "lora_target", "pref_beta", "pref_loss", "pref_ftx", "cutoff_len",
           "template", "dataset_dir", "max_samples", "val_size", "plot_loss", "kto_chosen_weight",
           "kto_rejected_weight", "preprocessing_num_workers", "eval_dataset", "media_dir", "freeze_trainable_layers",
           "flash_attn", "pref_bco_weight", "dpo_label_smoothing", "image_max_pixels", "dpo_beta",
           "orpo_beta", "dpo_loss", "dpo_ftx")
STAGES = ("dpo", "kto", "rm")
LEGACY = {"dpo_beta": "pref_beta", "dpo_loss": "pref_loss", "dpo_ftx": "pref_ftx", "orpo_beta": "pref_beta"}
REFUSED_STAGES = {"sft": "supervised fine-tuning (preftune trains preference objectives; its --loss sft trains on "
                         "preference data's chosen replies)",
                  "pt": "pre-training on raw text", "ppo": "PPO (online RL with a reward model)"}

# keys with no effect in preftune, and why
IGNORED = {
    "template": "preftune applies the tokenizer's own chat template (LLaMA-Factory's template table is not bundled)",
    "preprocessing_num_workers": "preftune tokenises in the training process",
    "preprocessing_batch_size": "preftune tokenises in the training process",
    "overwrite_cache": "preftune keeps no cache of tokenised data",
    "tokenized_path": "preftune keeps no cache of tokenised data",
    "data_shared_file_system": "preftune keeps no cache of tokenised data",
    "plot_loss": "`preftune plot OUTPUT_DIR` draws the logged metrics after (or during) the run",
    "streaming": "preftune reads the whole data set before training",
    "buffer_size": "preftune reads the whole data set before training",
    "train_on_prompt": "preference losses score the replies only",
    "mask_history": "preference losses score the final replies only",
    "ignore_pad_token_for_loss": "padding never enters preftune's losses",
    "eval_num_beams": "`preftune train` does not generate",
    "eval_on_each_dataset": "the eval sets are scored together",
    "enable_thinking": "the tokenizer's chat template decides",
    "preserve_thinking": "the tokenizer's chat template decides",
    "tool_format": "tool turns are not supported",
    "compute_accuracy": "preftune logs preference accuracies always",
    "include_effective_tokens_per_second": "not measured",
    "image_max_pixels": "the image processor's own resolution settings apply",
    "image_min_pixels": "the image processor's own resolution settings apply",
    "video_max_pixels": "videos are not supported", "video_min_pixels": "videos are not supported",
    "video_fps": "videos are not supported", "video_maxlen": "videos are not supported",
    "image_do_pan_and_scan": "the image processor's own settings apply",
    "crop_to_patches": "the image processor's own settings apply",
    "use_audio_in_video": "audio is not supported", "audio_sampling_rate": "audio is not supported",
    "disable_gradient_checkpointing": "preftune checkpoints layers from its memory budget "
                                      "(--max_activation_memory_gb, --activation_checkpointing)",
    "use_reentrant_gc": "preftune's own layer checkpointing", "upcast_layernorm": "weights keep --dtype",
    "upcast_lmhead_output": "preftune's LM head computes log-probs in float32",
    "use_fast_tokenizer": "transformers 5 always loads the fast tokenizer",
    "low_cpu_mem_usage": "transformers 5 loads weights directly", "print_param_status": "not printed",
    "model_revision": "the model's default revision is loaded", "cache_dir": "the Hugging Face cache is used",
    "hf_hub_token": "the Hugging Face login is used", "ms_hub_token": "ModelScope is not used",
    "om_hub_token": "Modelers is not used", "infer_backend": "inference setting", "infer_dtype": "inference setting",
    "use_kv_cache": "inference setting", "offload_folder": "weights are not offloaded",
    "quantization_device_map": "the quantised model is placed on the training device",
    "enable_liger_kernel": "preftune's chunked LM head already avoids the full logits",
    "use_v1_kernels": "preftune's own engine", "use_unsloth": "preftune's own engine",
    "use_unsloth_gc": "preftune's own engine", "shift_attn": "not supported, full attention is used",
    "compute_dtype": "weights use --dtype", "device_map": "the training device", "model_max_length": "cutoff_len",
    "block_diag_attn": "preftune packs pairs without cross-attention between them (--padding_free)",
    "packing": "preftune packs pairs into rows without padding (--padding_free, its default)",
    "neat_packing": "preftune packs pairs without cross-attention between them (--padding_free)",
    "create_new_adapter": "one adapter is trained", "ppo_buffer_size": "PPO only", "ppo_epochs": "PPO only",
    "ppo_score_norm": "PPO only", "ppo_target": "PPO only", "ppo_whiten_rewards": "PPO only",
    "reward_model_type": "PPO only", "disable_shuffling": "the training sampler shuffles (seeded by --seed)",
    "predict_with_generate": "`preftune train` does not generate", "generation_max_length": "no generation",
    "generation_num_beams": "no generation", "ray_num_workers": "Ray is not used", "ray_init_kwargs": "Ray is not used",
    "use_swanlab": "--report_to names the loggers", "early_stopping_steps": "not supported; training runs to the end",
    "freeze_trainable_layers": "finetuning_type freeze only", "freeze_trainable_modules": "finetuning_type freeze only",
    "freeze_extra_modules": "finetuning_type freeze only", "loraplus_lr_embedding": "LoRA+ is not supported",
}
# keys preftune cannot honour when set (to anything but their default)
REFUSED = {
    "use_galore": "GaLore", "use_apollo": "APOLLO", "use_badam": "BAdam", "use_adam_mini": "Adam-mini",
    "use_muon": "Muon", "use_llama_pro": "LLaMA Pro", "use_mca": "mcore_adapter", "use_megatron_bridge": "Megatron",
    "use_hyper_parallel": "hyper-parallel training", "use_rslora": "rank-stabilised LoRA", "use_dora": "DoRA",
    "pissa_init": "PiSSA", "pissa_convert": "PiSSA", "loraplus_lr_ratio": "LoRA+", "additional_target":
    "extra trainable modules (modules_to_save)", "rope_scaling": "RoPE scaling", "mixture_of_depths": "mixture of depths",
    "train_from_scratch": "training from scratch", "resize_vocab": "vocabulary resizing", "add_tokens": "new tokens",
    "add_special_tokens": "new special tokens", "new_special_tokens_config": "new special tokens",
    "split_special_tokens": "splitting special tokens", "adapter_folder": "adapter folders", "fp8": "FP8 training",
    "default_system": "a default system prompt (put it in the data's system column)",
    "ref_model": "a separate reference model (the reference is the starting policy)",
    "ref_model_adapters": "a separate reference model", "ref_model_quantization_bit": "a separate reference model",
    "reward_model": "a reward model for PPO", "reward_model_adapters": "a reward model for PPO",
    "reward_model_quantization_bit": "a reward model for PPO", "use_asft_loss": "ASFT", "use_dft_loss": "DFT",
    "use_eaft_loss": "EAFT", "enable_torch_profiler": "the torch profiler",
    "interleave_probs": "interleaved mixing (data sets are concatenated)", "use_kt": "KTransformers",
}
RENAMED = {"evaluation_strategy": "eval_strategy", "warmup_ratio": "warmup_steps", "moe_aux_loss_coef":
           "router_aux_loss_coef", "adapter_name_or_path": "peft_model_id"}
LOSS_KEYS = ("stage", "pref_loss", "pref_beta", "pref_ftx", "pref_bco_weight", "simpo_gamma", "ld_alpha",
             "dpo_label_smoothing", "kto_chosen_weight", "kto_rejected_weight")
DATA_KEYS = ("dataset", "eval_dataset", "dataset_dir", "media_dir", "max_samples", "val_size", "mix_strategy")
OWN = ("finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "cutoff_len", "quantization_bit",
       "quantization_method", "quantization_type", "double_quantization", "flash_attn", "pure_bf16",
       "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model", "deepspeed")
KNOWN = {"lora_rank", "lora_alpha", "lora_dropout"} | set(LEGACY) | set(IGNORED) | set(REFUSED) | set(RENAMED) | set(LOSS_KEYS) | set(DATA_KEYS) | set(OWN) | set(MARKERS)


def is_classic(config: dict, valid: set[str]) -> bool:
    """The YAML mapping has a key that only LLaMA-Factory's classic format has (:data:`MARKERS`; keys that
    ms-swift shares, such as ``lora_rank``, do not count) and no ``rlhf_type`` (ms-swift's)."""
    return "rlhf_type" not in config and any(key in config and key not in valid for key in MARKERS)


def translate_classic(config: dict, source: str, valid: set[str], cli: set[str]) -> Door:
    """A classic LLaMA-Factory config → preftune flags (see the module docstring).

    Args:
        config: the YAML mapping. source: its path (named in messages). valid: preftune's flag names.
        cli: the flags given on the command line (they win; a ``--dataset`` there replaces the
            config's data sets, whose resolution is then skipped).

    Raises:
        ConfigError: a stage or key preftune cannot honour, a missing model or data set, an unknown key.
    """
    door = Door(LLAMAFACTORY, source, valid, cli)
    c = dict(config)
    stage = str(c.pop("stage", "sft"))
    for old, new in LEGACY.items():  # LLaMA-Factory before the pref_* names (2024)
        if old in c:
            door.notes.append(f"{old} (an older LLaMA-Factory name) = {new}")
            c.setdefault(new, c.pop(old))
    if stage == "orpo":  # LLaMA-Factory before mid-2024: its own ORPO stage, now stage dpo with pref_loss orpo
        door.notes.append("stage orpo (an older LLaMA-Factory stage) = stage dpo with pref_loss orpo")
        stage = "dpo"
        c.setdefault("pref_loss", "orpo")
    if stage in REFUSED_STAGES:
        given = "stage" in config
        raise ConfigError(f"{source}: stage {stage}" + ("" if given else " (LLaMA-Factory's default: the config has "
                          "no stage)") + f": {REFUSED_STAGES[stage]} is not something preftune trains; preftune "
                          f"trains stage {' / '.join(STAGES)}")
    if stage not in STAGES:
        raise ConfigError(f"{source}: stage {stage!r} is not a LLaMA-Factory stage preftune trains ({', '.join(STAGES)})")
    door.require_model(c.get("model_name_or_path"), "model_name_or_path")
    _method(door, c)
    _loss(door, c, stage)
    _data(door, c, stage)
    for key, value in (("learning_rate", "5e-5"), ("logging_steps", "500")):  # transformers' defaults, not preftune's
        if key not in c:
            door.set(key, value, f"{key} (LLaMA-Factory: transformers' default)")
    for key in list(c):
        value = c.pop(key)
        if key in RENAMED:
            door.rename(key, value, RENAMED[key])
        elif key in IGNORED:
            door.ignore(key, value, IGNORED[key])
        elif key in REFUSED:
            door.refuse_if_set(key, value, REFUSED[key])
        elif key in valid:
            door.keep(key, value)
        else:
            door.unknown(key, sorted(KNOWN | valid))
    return door


def _method(door: Door, c: dict) -> None:
    kind = str(c.pop("finetuning_type", "lora"))
    if kind not in ("lora", "full"):
        raise ConfigError(f"{door.source}: finetuning_type {kind}: preftune trains LoRA adapters (lora) or all weights "
                          "(full); freeze (the last layers only) and oft are not supported")
    door.set("use_peft", "true" if kind == "lora" else "false", f"finetuning_type {kind}")
    rank = int(number(door.source, "lora_rank", c.pop("lora_rank", 8)))
    alpha = c.pop("lora_alpha", None)
    if kind == "lora":
        door.set("lora_r", str(rank), "lora_rank")
        door.set("lora_alpha", str(int(number(door.source, "lora_alpha", alpha)) if alpha is not None else 2 * rank),
                 "lora_alpha" if alpha is not None else "lora_alpha (LLaMA-Factory: 2 x lora_rank)")
        door.set("lora_dropout", str(c.pop("lora_dropout", 0.0)), "lora_dropout")
        target = c.pop("lora_target", "all")
        names = target if isinstance(target, list) else str(target).replace(",", " ").split()
        door.set("lora_target_modules", ["all-linear"] if names == ["all"] else [str(n) for n in names], "lora_target")
    else:
        for key in ("lora_alpha", "lora_dropout", "lora_target"):
            if key in c:
                door.ignore(key, c.pop(key), "finetuning_type full trains all weights")
    bits = c.pop("quantization_bit", None)
    method = str(c.pop("quantization_method", "bnb"))
    if bits is not None:
        if method != "bnb" or str(bits) not in ("4", "8"):
            raise ConfigError(f"{door.source}: quantization_bit {bits} (quantization_method {method}): preftune "
                              "quantises on the fly with bitsandbytes to 4 or 8 bits only")
        door.set(f"load_in_{bits}bit", "true", "quantization_bit")
    if "quantization_type" in c:
        door.set("bnb_4bit_quant_type", str(c.pop("quantization_type")), "quantization_type")
    if "double_quantization" in c:
        door.set("use_bnb_nested_quant", lf_bool(c.pop("double_quantization")), "double_quantization")
    attn = c.pop("flash_attn", None)
    if attn is not None:
        door.attention(str(attn))
    if lf_bool(c.pop("pure_bf16", False)) == "true":
        door.set("dtype", "bfloat16", "pure_bf16")
    tower = lf_bool(c.pop("freeze_vision_tower", True))
    door.set("freeze_vision_tower", tower, "freeze_vision_tower")
    projector = lf_bool(c.pop("freeze_multi_modal_projector", True))
    if projector != tower:
        raise ConfigError(f"{door.source}: freeze_multi_modal_projector {projector} with freeze_vision_tower {tower}: "
                          "preftune freezes or trains the vision tower and its projector together")
    if lf_bool(c.pop("freeze_language_model", False)) == "true":
        raise ConfigError(f"{door.source}: freeze_language_model true: preftune always trains the language model")
    if "deepspeed" in c:
        door.deepspeed(c.pop("deepspeed"))


def _loss(door: Door, c: dict, stage: str) -> None:
    LossPlan(door, stage).apply({key: c.pop(key) for key in LOSS_KEYS[1:] if key in c})


def _data(door: Door, c: dict, stage: str) -> None:
    dataset_dir = str(c.pop("dataset_dir", "data"))
    media = c.pop("media_dir", None)
    if media is not None and str(media) != dataset_dir:
        door.ignore("media_dir", media, "image paths resolve against dataset_dir (the folder of dataset_info.json)")
    strategy = str(c.pop("mix_strategy", "concat"))
    if strategy != "concat":
        raise ConfigError(f"{door.source}: mix_strategy {strategy}: preftune concatenates data sets (concat) only")
    limit = c.pop("max_samples", None)
    limit = int(number(door.source, "max_samples", limit)) if limit is not None else None
    cutoff = int(number(door.source, "cutoff_len", c.pop("cutoff_len", 2048)))
    door.set("max_length", str(cutoff), "cutoff_len")
    door.set("max_prompt_length", str(max(1, cutoff // 2)), "cutoff_len (LLaMA-Factory shares it between prompt "
             "and reply by their lengths; preftune: the prompt up to half)")
    val = c.pop("val_size", 0.0)
    if val:
        size = number(door.source, "val_size", val)
        if size >= 1:
            raise ConfigError(f"{door.source}: val_size {val}: a count of held-out records; preftune holds out a share "
                              "(--eval_ratio): give val_size as a fraction below 1")
        door.set("eval_ratio", str(size), "val_size")
    names, eval_names = c.pop("dataset", None), c.pop("eval_dataset", None)
    if door.cli_gives("dataset"):
        door.notes.append("dataset: not used, --dataset is given on the command line")
    else:
        if names is None:
            raise ConfigError(f"{door.source}: no dataset: name the training data (dataset: NAME of "
                              f"{dataset_dir}/dataset_info.json), or give --dataset FILE")
        door.datasets("dataset", resolve(names, dataset_dir, door.source, stage, limit))
    if eval_names is not None and not door.cli_gives("eval_file"):
        door.datasets("eval_file", resolve(eval_names, dataset_dir, door.source, stage, limit))
