"""Quantised base weights for QLoRA: 4-bit NF4 and 8-bit (LLM.int8()) through bitsandbytes.

``--load_in_4bit`` loads every linear layer of the body as bitsandbytes ``Linear4bit`` (NF4 data
type with double quantisation of the block scales by default; Dettmers et al. 2023, "QLoRA",
arXiv 2305.14314, Sec. 3), ``--load_in_8bit`` as ``Linear8bitLt`` (Dettmers et al. 2022,
"LLM.int8()", arXiv 2208.07339: vector-wise int8 with fp16 outlier columns). The output head
(``lm_head``) and the embeddings stay unquantised, so the engine's chunked LM head works as for a
dense model. LoRA adapters train on top (:func:`preftune.models.peft.apply_peft` runs
``peft.prepare_model_for_kbit_training`` first: the remaining float weights in float32, the
input embeddings' outputs requiring grads).

bitsandbytes >= 0.45 runs on CPU as well as CUDA (``pip install "preftune[qlora]"``); on CPU the
model is placed on the CPU (``device_map={"": "cpu"}``), on a GPU on the current CUDA device.

Compute dtype of the 4-bit matmuls (``--bnb_4bit_compute_dtype``): ``auto`` is bfloat16 on a
GPU that supports it, float16 on other GPUs, float32 on CPU.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from preftune.config import PeftArguments
from preftune.errors import ModelLoadError
from preftune.modeling import unwrap_peft

logger = logging.getLogger("preftune.models")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_bitsandbytes(flag: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"{flag} needs the bitsandbytes package: pip install \"preftune[qlora]\" "
                             "(or pip install \"bitsandbytes>=0.50\")")


class _OnceFilter(logging.Filter):
    """Lets the first record starting with ``prefix`` through, drops the later ones."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


def _log_cast_warning_once() -> None:
    """LLM.int8() casts float32 inputs to float16 for its matmul and logs a warning on every call
    (thousands per step); keep the first."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in log.filters):
        log.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


def compute_dtype(name: str | None) -> torch.dtype:
    """The 4-bit compute dtype for ``--bnb_4bit_compute_dtype name`` (see the module docstring)."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return _DTYPES[name]


def quantization_config(peft_args: PeftArguments):
    """The ``transformers.BitsAndBytesConfig`` of ``--load_in_4bit`` / ``--load_in_8bit``, or None.

    Raises:
        ModelLoadError: bitsandbytes is not installed.
    """
    if not (peft_args.load_in_4bit or peft_args.load_in_8bit):
        return None
    _check_bitsandbytes("--load_in_4bit (QLoRA)" if peft_args.load_in_4bit else "--load_in_8bit")
    from transformers import BitsAndBytesConfig

    if peft_args.load_in_8bit:
        _log_cast_warning_once()
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=peft_args.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=peft_args.use_bnb_nested_quant,
                              bnb_4bit_compute_dtype=compute_dtype(peft_args.bnb_4bit_compute_dtype))


def quantization_kwargs(peft_args: PeftArguments) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for quantised loading: ``quantization_config`` and
    ``device_map`` (the current CUDA device, else the CPU); ``{}`` without quantisation.

    Raises:
        ModelLoadError: bitsandbytes is not installed.
    """
    config = quantization_config(peft_args)
    if config is None:
        return {}
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    bits = 4 if peft_args.load_in_4bit else 8
    logger.info("loading the base weights in %d-bit (bitsandbytes%s) on %s", bits,
                f", {peft_args.bnb_4bit_quant_type}, double quantisation {peft_args.use_bnb_nested_quant}, compute "
                f"{compute_dtype(peft_args.bnb_4bit_compute_dtype)}" if bits == 4 else "",
                "cuda" if device != "cpu" else "cpu")
    return {"quantization_config": config, "device_map": {"": device}}


def check_sharding(peft_args: PeftArguments, training_args: Any) -> None:
    """Refuse QLoRA together with weight sharding, which preftune does not set up: FSDP (``--fsdp``)
    and DeepSpeed ZeRO-3 would need the 4-bit weights stored in a float dtype
    (``bnb_4bit_quant_storage``) and no ``device_map``, neither of which this loader does; DDP and
    ZeRO-1/2 keep whole weights per rank and work as they are.

    Raises:
        preftune.errors.ConfigError: ``--load_in_4bit`` / ``--load_in_8bit`` with ``--fsdp`` or ZeRO-3.
    """
    from preftune.errors import ConfigError

    if not (peft_args.load_in_4bit or peft_args.load_in_8bit):
        return
    flag = "--load_in_4bit" if peft_args.load_in_4bit else "--load_in_8bit"
    if getattr(training_args, "fsdp", None):
        raise ConfigError(f"{flag} with --fsdp is not supported (the quantised weights would need "
                          "bnb_4bit_quant_storage and no device map); use DDP or DeepSpeed ZeRO-2, or drop the flag")
    from transformers.integrations import is_deepspeed_zero3_enabled

    if getattr(training_args, "deepspeed", None) and is_deepspeed_zero3_enabled():
        raise ConfigError(f"{flag} with DeepSpeed ZeRO-3 is not supported (the quantised weights would need "
                          "bnb_4bit_quant_storage and no device map); use ZeRO-2 or DDP, or drop the flag")


def quantization_identity(peft_args: PeftArguments) -> str:
    """A short string naming the quantisation (part of the reference-log-prob cache key): ``""`` for
    none, else e.g. ``"nf4+dq/float32"`` or ``"int8"``."""
    if getattr(peft_args, "load_in_8bit", False):
        return "int8"
    if getattr(peft_args, "load_in_4bit", False):
        dq = "+dq" if getattr(peft_args, "use_bnb_nested_quant", True) else ""
        dtype = compute_dtype(getattr(peft_args, "bnb_4bit_compute_dtype", "auto"))
        return f"{getattr(peft_args, 'bnb_4bit_quant_type', 'nf4')}{dq}/{str(dtype).removeprefix('torch.')}"
    return ""


def is_quantized(model) -> bool:
    """True when ``model`` (or the model inside a peft wrapper) holds bitsandbytes 4-bit or 8-bit weights."""
    base = unwrap_peft(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def limit_cpu_weight_packing(model, training: bool) -> int:
    """Keep bitsandbytes' CPU inference repacking off where it breaks; returns the layers changed.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit.forward`` in eval mode (input
    without gradient) repacks the layer's 4-bit weight in place for its CPU GEMM kernel, and from
    then on every forward of that layer, training ones included, takes the inference kernel. The
    repacking needs ``out_features % 32 == 0`` and ``in_features`` a multiple of the quantisation
    block size (64), else it raises (``shape '[32, 0]' is invalid``: layers narrower than a block).
    A model loaded for training (``training=True``: evaluation steps run between training steps)
    gets it switched off in every 4-bit layer; an inference model only in layers whose shapes it
    cannot handle. No effect without bitsandbytes or on other CPUs / devices.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit) or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        block = int(getattr(state, "blocksize", 64) or 64)
        packable = module.out_features % 32 == 0 and module.in_features % block == 0 and module.in_features % 2 == 0
        if training or not packable:
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
