"""LLaMA-Factory's v1 configs (``llamafactory-cli dpo x.yaml`` with ``USE_V1=1``; ``examples/v1/``), read as written.

A YAML file with ``model`` and a key only the v1 format has (:data:`MARKERS`: ``model_class``,
``peft_config``, ``train_dataset``, ``micro_batch_size`` ...) is a v1 config. Its keys and defaults
(``src/llamafactory/v1/config/*_args.py`` and the LoRA plugin, read, not copied): ``model``,
``peft_config`` (``name: lora`` with ``r`` 8, ``lora_alpha`` 16, ``lora_dropout`` 0.05,
``target_modules`` all; none: all weights; ``name: freeze`` refused), ``train_dataset`` /
``eval_dataset`` (a data file, a Hub id, or a dataset YAML of named entries with ``path``, ``source``,
``split``, ``converter``, ``size``), ``micro_batch_size`` 1, ``global_batch_size`` (→ gradient
accumulation), ``cutoff_len`` 2048, ``learning_rate`` 1e-4, ``num_train_epochs`` 3, ``bf16`` true,
``logging_steps`` 1, ``seed`` 42 and the preference keys of the classic format. The stage is the
command's (``dpo`` / ``rm`` / ``sft``), not the file's: ``preftune train`` runs ``dpo`` (``pref_loss``)
unless ``--loss`` says otherwise, and says so in one line.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from preftune.errors import ConfigError

from .dataset_info import v1_spec
from .lf_common import Door, LossPlan, lf_bool, number

V1 = "LLaMA-Factory v1"
MARKERS = ("model_class", "peft_config", "train_dataset", "micro_batch_size", "global_batch_size", "kernel_config",
           "dist_config", "init_config", "quant_config", "batching_strategy", "sample_backend")
LOSS_KEYS = ("pref_loss", "pref_beta", "pref_ftx", "simpo_gamma", "ld_alpha", "dpo_label_smoothing")
IGNORED = {
    "kernel_config": "preftune's own engine (chunked LM head, packed attention)",
    "batching_workers": "preftune batches in the training process",
    "enable_activation_checkpointing": "preftune checkpoints layers from its memory budget (--max_activation_memory_gb)",
    "dist_timeout": "the launcher's timeout applies", "cp_mode": "context parallel is not supported",
    "mp_replicate_size": "one model replica per process", "mp_shard_size": "one model replica per process",
    "dp_size": "the launched processes", "save_epochs": "use --save_strategy epoch", "save_ckpt_as_hf":
    "checkpoints are Hugging Face directories", "init_config": "the model's weights are loaded",
    "sample_backend": "`preftune train` does not generate", "max_new_tokens": "`preftune train` does not generate",
    "optim_config": "AdamW (transformers' --optim)", "lr_scheduler_config": "use --lr_scheduler_type",
}


def is_v1(config: dict, valid: set[str]) -> bool:
    """``model`` plus a key only the v1 format has (:data:`MARKERS`)."""
    return "model" in config and any(key in config and key not in valid for key in MARKERS)


def translate_v1(config: dict, source: str, valid: set[str], cli: set[str]) -> Door:
    """A v1 config → preftune flags (see the module docstring).

    Raises:
        ConfigError: a key preftune cannot honour, no model or no data set, an unknown key.
    """
    door = Door(V1, source, valid, cli)
    c = dict(config)
    door.require_model(c.pop("model", None), "model")
    kind = str(c.pop("model_class", "llm"))
    if kind not in ("llm", "cls"):
        raise ConfigError(f"{source}: model_class {kind}: preftune trains causal LMs (llm) and reward models (cls)")
    _peft(door, c.pop("peft_config", None))
    if c.get("quant_config"):
        quant = c.pop("quant_config")
        bits = quant.get("quantization_bit") if isinstance(quant, dict) else None
        if str(bits) not in ("4", "8"):
            raise ConfigError(f"{source}: quant_config {quant}: preftune quantises with bitsandbytes to 4 or 8 bits "
                              "(quantization_bit)")
        door.set(f"load_in_{bits}bit", "true", "quant_config.quantization_bit")
    if c.get("custom_chat_template"):
        raise ConfigError(f"{source}: custom_chat_template: preftune applies the tokenizer's own chat template; save "
                          "the template with the tokenizer (tokenizer_config.json) instead")
    c.pop("custom_chat_template", None)
    if c.get("flash_attn") is not None:
        door.attention(str(c.pop("flash_attn")))
    if door.cli_gives("loss"):
        door.notes.append("the stage: --loss is given on the command line")
    elif kind == "cls":
        door.set("loss", "rm", "model_class cls (a reward model: `llamafactory-cli rm`)")
    else:
        door.notes.append("the stage comes from LLaMA-Factory's command (llamafactory-cli dpo / rm / sft), not the "
                          "file: preftune train runs dpo with pref_loss (give --loss rm for a reward model)")
    LossPlan(door, "rm" if kind == "cls" else "dpo").apply({k: c.pop(k) for k in LOSS_KEYS if k in c})
    _training(door, c)
    for flag, key in (("dataset", "train_dataset"), ("eval_file", "eval_dataset")):
        value = c.pop(key, None)
        if door.cli_gives(flag):
            door.notes.append(f"{key}: not used, --{flag} is given on the command line")
        elif value is None and key == "train_dataset":
            raise ConfigError(f"{source}: no train_dataset: name the training data (a file, a Hub id or a dataset "
                              "YAML), or give --dataset FILE")
        elif value is not None:
            door.set(flag, dataset_specs(str(value), source), key)
    for key in list(c):
        value = c.pop(key)
        if key in IGNORED:
            door.ignore(key, value, IGNORED[key])
        elif key == "dist_config":
            _dist(door, value)
        elif key == "cp_size" and int(number(source, key, value)) > 1:
            raise ConfigError(f"{source}: cp_size {value}: context parallel is not supported by preftune")
        elif key == "cp_size":
            continue
        elif key in valid:
            door.keep(key, value)
        else:
            door.unknown(key, sorted(set(valid) | set(MARKERS) | set(IGNORED) | set(LOSS_KEYS)))
    return door


def _peft(door: Door, peft: Any) -> None:
    if peft is None:
        door.set("use_peft", "false", "no peft_config (all weights)")
        return
    peft = {"name": peft} if isinstance(peft, str) else dict(peft)
    name = peft.pop("name", "lora")
    if name != "lora":
        raise ConfigError(f"{door.source}: peft_config name {name}: preftune trains LoRA adapters or all weights "
                          "(no peft_config); freeze (the last layers only) is not supported")
    door.set("use_peft", "true", "peft_config lora")
    door.set("lora_r", str(int(number(door.source, "peft_config.r", peft.pop("r", 8)))), "peft_config.r")
    door.set("lora_alpha", str(int(number(door.source, "peft_config.lora_alpha", peft.pop("lora_alpha", 16)))),
             "peft_config.lora_alpha")
    door.set("lora_dropout", str(peft.pop("lora_dropout", 0.05)), "peft_config.lora_dropout")
    target = peft.pop("target_modules", "all")
    names = target if isinstance(target, list) else str(target).replace(",", " ").split()
    door.set("lora_target_modules", ["all-linear"] if names == ["all"] else [str(n) for n in names],
             "peft_config.target_modules")
    if peft.get("adapter_name_or_path"):
        door.set("peft_model_id", str(peft.pop("adapter_name_or_path")), "peft_config.adapter_name_or_path")
    for key, value in peft.items():
        if key in ("use_rslora", "use_dora", "modules_to_save"):
            door.refuse_if_set(f"peft_config.{key}", value, key)
        else:
            door.ignore(f"peft_config.{key}", value, "an export / inference setting")


def _training(door: Door, c: dict) -> None:
    source = door.source
    micro = int(number(source, "micro_batch_size", c.pop("micro_batch_size", 1)))
    door.set("per_device_train_batch_size", str(micro), "micro_batch_size")
    if c.get("global_batch_size") is not None:
        total = int(number(source, "global_batch_size", c.pop("global_batch_size")))
        world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
        steps = max(1, total // (micro * world))
        door.set("gradient_accumulation_steps", str(steps), f"global_batch_size {total} / (micro_batch_size {micro} x "
                 f"{world} processes)")
    cutoff = int(number(source, "cutoff_len", c.pop("cutoff_len", 2048)))
    door.set("max_length", str(cutoff), "cutoff_len")
    door.set("max_prompt_length", str(max(1, cutoff // 2)), "cutoff_len (the prompt up to half)")
    for key, default in (("learning_rate", "1e-4"), ("num_train_epochs", "3"), ("logging_steps", "1"),
                         ("seed", "42"), ("max_grad_norm", "1.0")):
        given = key in c
        door.set(key, str(c.pop(key, default)), key if given else f"{key} (v1 default)")
    door.set("bf16", lf_bool(c.pop("bf16", True)), "bf16")
    strategy = str(c.pop("batching_strategy", "normal"))
    if strategy in ("padding_free", "dynamic_padding_free"):
        door.set("padding_free", "true", f"batching_strategy {strategy}")
    elif strategy != "normal" and strategy != "dynamic_batching":
        raise ConfigError(f"{source}: batching_strategy {strategy!r}: normal, padding_free, dynamic_batching or "
                          "dynamic_padding_free")


def _dist(door: Door, value: Any) -> None:
    name = value.get("name") if isinstance(value, dict) else value
    if name == "deepspeed":
        door.deepspeed(value.get("config_file") if isinstance(value, dict) else "zero3")
    else:
        door.ignore("dist_config", value, "preftune shards with --fsdp / DeepSpeed when launched on several "
                    "processes; one process here trains unsharded")


def dataset_specs(value: str, source: str) -> list[str]:
    """A v1 ``train_dataset`` → ``--dataset`` specs: a data file or Hub id as it is; a dataset YAML
    (``name: {path, source, split, converter, size}`` entries) → one spec per entry.

    Raises:
        ConfigError: an unreadable dataset YAML, an SFT converter (not preference data), a Hub
            entry while offline, or ``weight`` (re-weighting is not supported).
    """
    if not value.endswith((".yaml", ".yml")):
        return [v1_spec(value)]
    if not os.path.isfile(value):
        raise ConfigError(f"{source}: train_dataset {value}: not found (a dataset YAML on the Hub is not supported)")
    try:
        entries = yaml.safe_load(open(value, encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{value}: cannot read ({err})") from None
    if not isinstance(entries, dict):
        raise ConfigError(f"{value}: expected a mapping of data set names to entries")
    specs = []
    for name, entry in entries.items():
        if not isinstance(entry, dict) or "path" not in entry:
            raise ConfigError(f"{value}, {name}: an entry needs a path")
        converter = entry.get("converter")
        if converter not in (None, "pair"):
            raise ConfigError(f"{value}, {name}: converter {converter}: SFT data, not preference pairs (converter pair, "
                              "or chosen_messages / rejected_messages records)")
        if entry.get("weight") is not None:
            raise ConfigError(f"{value}, {name}: weight: re-weighting data sets is not supported; use size (#N)")
        path = str(entry["path"])
        if entry.get("source", "hf_hub") == "hf_hub":
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
                raise ConfigError(f"{value}, {name}: {path} is on the Hugging Face Hub and this run is offline "
                                  "(HF_HUB_OFFLINE); download it and give its file with source: local")
            split = entry.get("split", "train")
            path += "" if split == "train" else f":{split}"
        specs.append(v1_spec(path + (f"#{int(entry['size'])}" if entry.get("size") else "")))
    return specs
