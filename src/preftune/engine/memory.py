"""Memory of a training step: an activation estimate, layer checkpointing from a budget, heap trimming.

**Activation estimate** (bytes saved for the backward per token and decoder layer, from the
config; ``b`` = bytes per saved element: the autocast dtype's under mixed precision, else the parameters', ``H`` hidden size, ``I`` MLP width, ``Hq`` /
``Hkv`` query / key-value heads of width ``D``, ``r`` LoRA rank)::

    b · (2·Hq·D + 2·Hkv·D + Hq      attention: Q, K, V, output, log-sum-exp (blockwise kernel)
         + 4·H + 2                  the two RMSNorms (input, normalised input, 1/rms)
         + 4·I                      SwiGLU: gate, act(gate), up, and their product (down's input)
         + 8·r)                     LoRA rank-r intermediates

For SmolLM2-135M (H 576, I 1536, 9/3 heads of 64, r 16) this is 40.4 KB per token and layer;
measured with saved-tensor hooks: 39.5 KB (``benchmarks/memory_model.py``, docs/performance.md).

**Budget** (``--max_activation_memory_gb``; unset: 2 GiB on the CPU, half the free memory on a
GPU, :class:`preftune.device.DevicePolicy`): before each training forward,
``tokens × layers × estimate`` is compared with the budget; when it is larger, the first ``k``
decoder layers are checkpointed (their input kept, the rest recomputed in the backward), with the
smallest ``k`` that brings the estimate under the budget. The first layers are chosen because
their recomputation runs last in the backward, when the later layers' activations are already
freed. ``--activation_checkpointing true`` still checkpoints every layer; ``inf`` never
checkpoints automatically.

**Heap trimming** (``--malloc_trim``, default on, glibc only): PyTorch allocates CPU tensors with
``posix_memalign``; with glibc 2.36 a freed activation-sized block is often not reused by the
next same-sized aligned request, so the heap keeps about as many free bytes as the forward saves.
``malloc_trim(0)`` after every decoder layer's forward and before its backward returns those
pages to the system. Each trim costs time (the pages are faulted back in), so by default it runs
only when the resident memory not held by malloc grew by ``--malloc_trim_threshold_mb`` (256 MiB)
since the last trim. The measurements behind these choices (free heap next to saved activations,
peak RSS and step time per threshold) are in docs/performance.md ("heap trimming").
"""

from __future__ import annotations

import ctypes
import logging
import math
from functools import partial
from typing import Optional

import torch
from torch import nn

from preftune.device import DevicePolicy

logger = logging.getLogger("preftune.engine")

_LIBC = None


def _libc():
    """glibc with ``malloc_trim``, or False (musl, macOS, Windows)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def malloc_trim() -> bool:
    """glibc ``malloc_trim(0)``: give free heap pages back to the system. False where unavailable."""
    libc = _libc()
    if not libc:
        return False
    libc.malloc_trim(0)
    return True


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_MALLINFO2 = None
_PAGE = 4096
#: resident bytes not in use by malloc right after the last trim (None: no trim yet)
_UNUSED_AFTER_TRIM: Optional[int] = None


def _mallinfo2():
    global _MALLINFO2, _PAGE
    if _MALLINFO2 is None:
        _MALLINFO2 = False
        libc = _libc()
        fn = getattr(libc, "mallinfo2", None) if libc else None  # glibc >= 2.33
        if fn is not None:
            import os

            fn.restype = _MallInfo2
            fn.argtypes = []
            _MALLINFO2, _PAGE = fn, os.sysconf("SC_PAGE_SIZE")
    return _MALLINFO2


def resident_unused_bytes() -> Optional[int]:
    """Resident memory of the process not held by a live malloc block, in bytes, or None (no glibc
    ``mallinfo2``): RSS (``/proc/self/statm``) minus the bytes malloc has handed out
    (``uordblks + hblkhd``). Includes a constant part (code, libraries, mapped files); its growth is
    free heap that the system has not got back."""
    info = _mallinfo2()
    if not info:
        return None
    try:
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * _PAGE
    except OSError:
        return None
    m = info()
    return rss - int(m.uordblks) - int(m.hblkhd)


def malloc_trim_if_grown(threshold_mb: float) -> bool:
    """:func:`malloc_trim` when the resident-but-unused memory (:func:`resident_unused_bytes`) has
    grown by more than ``threshold_mb`` MiB since the last trim (always when it is 0 or unknown);
    returns whether it trimmed. The heap is the process's, so is the state (module-level)."""
    global _UNUSED_AFTER_TRIM
    if threshold_mb > 0 and _UNUSED_AFTER_TRIM is not None:
        unused = resident_unused_bytes()
        if unused is not None and unused - _UNUSED_AFTER_TRIM <= threshold_mb * 2 ** 20:
            _UNUSED_AFTER_TRIM = min(_UNUSED_AFTER_TRIM, unused)
            return False
    if not malloc_trim():
        return False
    if threshold_mb > 0:
        _UNUSED_AFTER_TRIM = resident_unused_bytes()
    return True


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The checkpointable decoder layers (transformers ``GradientCheckpointingLayer``), in order.

    Those of the language decoder when the model has one (a vision tower's layers excluded), else
    every outermost such layer of the model.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    root = model
    try:
        from preftune.engine.lm_head import get_decoder_and_head

        root = get_decoder_and_head(model)[0]
    except Exception:  # noqa: BLE001 - kinds without a decoder/head split (value heads): whole model
        root = model
    layers, inside = [], set()
    for module in root.modules():
        if id(module) in inside:
            continue
        if isinstance(module, GradientCheckpointingLayer):
            layers.append(module)
            inside.update(id(m) for m in module.modules())
    return layers


def _text_config(model: nn.Module):
    from preftune.modeling import unwrap_peft

    config = getattr(unwrap_peft(model), "config", None)
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


def _lora_rank(model: nn.Module) -> int:
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return 0
    return max(int(getattr(c, "r", 0) or 0) for c in peft_config.values())


def activation_element_size(model: nn.Module) -> int:
    """Bytes per saved activation element: the autocast dtype's when mixed precision is on for the
    parameters' device (``--bf16`` / ``--fp16``: activations are 2 bytes even with float32 weights),
    else the parameters' dtype."""
    param = next(model.parameters(), None)
    if param is None:
        return 4
    device_type = param.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.empty((), dtype=torch.get_autocast_dtype(device_type)).element_size()
    return param.element_size()


def activation_bytes_per_token_layer(model: nn.Module) -> int:
    """The estimate of the module docstring, in bytes (:func:`activation_element_size` per element)."""
    cfg = _text_config(model)
    h = int(getattr(cfg, "hidden_size", 0) or 0)
    hq = int(getattr(cfg, "num_attention_heads", 0) or 1)
    hkv = int(getattr(cfg, "num_key_value_heads", None) or hq)
    d = int(getattr(cfg, "head_dim", None) or (h // hq if hq else 0))
    inter = getattr(cfg, "intermediate_size", None) or 4 * h
    experts = getattr(cfg, "num_experts_per_tok", None)
    if experts and getattr(cfg, "moe_intermediate_size", None):
        inter = int(experts) * int(cfg.moe_intermediate_size) + int(getattr(cfg, "shared_expert_intermediate_size", 0)
                                                                    or 0)
    floats = 2 * hq * d + 2 * hkv * d + hq + 4 * h + 2 + 4 * int(inter) + 8 * _lora_rank(model)
    return int(floats * activation_element_size(model))


def plan_checkpointing(model: nn.Module, tokens: int, budget_gb: Optional[float]) -> int:
    """Checkpoint the first ``k`` decoder layers so that the estimate fits ``budget_gb``; returns ``k``.

    ``tokens``: token positions of the batch (rows × T). Layers the user had checkpointed
    (``--activation_checkpointing``) stay checkpointed (returns their number).
    """
    layers = decoder_layers(model)
    if not layers:
        return 0
    forced = getattr(model, "_preftune_user_checkpointing", None)
    if forced is None:
        forced = all(getattr(layer, "gradient_checkpointing", False) for layer in layers)
        model._preftune_user_checkpointing = forced
    if forced:
        return len(layers)
    k = 0
    if budget_gb is not None and not math.isinf(budget_gb):
        per_layer = tokens * activation_bytes_per_token_layer(model)
        hidden = int(getattr(_text_config(model), "hidden_size", 0) or 0)
        kept = tokens * hidden * activation_element_size(model)
        excess = per_layer * len(layers) - budget_gb * 2 ** 30
        if excess > 0:
            k = min(len(layers), math.ceil(excess / max(1, per_layer - kept)))
    for i, layer in enumerate(layers):
        want = i < k
        if want and getattr(layer, "_gradient_checkpointing_func", None) is None:
            layer._gradient_checkpointing_func = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        layer.gradient_checkpointing = want
    if k != getattr(model, "_preftune_checkpointed_layers", 0):
        logger.debug("checkpointing %d of %d decoder layers for %d tokens", k, len(layers), tokens)
    model._preftune_checkpointed_layers = k
    return k


def _trim_forward_hook(module, args, output):
    if not (getattr(module, "_preftune_trim", False) and module.training and torch.is_grad_enabled()):
        return None
    threshold = getattr(module, "_preftune_trim_threshold_mb", 0.0)
    malloc_trim_if_grown(threshold)
    out = output[0] if isinstance(output, tuple) else output
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.register_hook(partial(_trim_grad_hook, threshold))
    return None


def _trim_grad_hook(threshold_mb, grad):
    malloc_trim_if_grown(threshold_mb)
    return None


def install_malloc_trim(model: nn.Module, enabled: bool = True, threshold_mb: float = 0.0) -> int:
    """After every decoder layer's forward and before its backward (``enabled``), trim the heap when
    the resident-but-unused memory grew by more than ``threshold_mb`` MiB since the last trim
    (:func:`malloc_trim_if_grown`; 0: trim every time); or stop doing so. Idempotent; returns the
    number of layers hooked (0 without glibc)."""
    installed = getattr(model, "_preftune_trim_installed", False)
    if not installed and (not enabled or not _libc()):
        return 0
    layers = decoder_layers(model)
    for layer in layers:
        if not installed:
            layer.register_forward_hook(_trim_forward_hook)
        layer._preftune_trim = enabled
        layer._preftune_trim_threshold_mb = float(threshold_mb)
    model._preftune_trim_installed = True
    return len(layers)


def install_compiled_layers(model: nn.Module) -> int:
    """``torch.compile(dynamic=True)`` every decoder layer once (``--compile_layers``); returns how many.

    The attention kernel and the fused LoRA dropout are graph breaks (``torch.compiler.disable``),
    so each layer compiles into the parts around them (norms, projections, rotary, MLP)."""
    if getattr(model, "_preftune_compiled", False):
        return 0
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    model._preftune_compiled = True
    return len(layers)


def device_policy(model: nn.Module, device: torch.device) -> DevicePolicy:
    """The :class:`~preftune.device.DevicePolicy` of the device a model trains on, read once per model
    and device (on CUDA its free memory at the first training step sizes the activation budget)."""
    cached = getattr(model, "_preftune_device_policy", None)
    if cached is None or cached.device.type != device.type:
        cached = DevicePolicy.of(device)
        model._preftune_device_policy = cached
    return cached


def prepare_training_step(model: nn.Module, batch: dict[str, torch.Tensor], options) -> None:
    """Before a training forward: heap trimming hooks (``options.malloc_trim``, where the device policy
    trims: the CPU), compiled layers (``options.compile_layers``) and the layer checkpointing plan for
    this batch (``options.max_activation_memory_gb``; unset: the device policy's budget — 2 GiB on the
    CPU, a share of the free memory on a GPU)."""
    policy = device_policy(model, batch["input_ids"].device)
    trim = (options.malloc_trim and policy.trims_heap, options.malloc_trim_threshold_mb)
    if trim != getattr(model, "_preftune_trim_enabled", (False, None)):
        install_malloc_trim(model, *trim)
        model._preftune_trim_enabled = trim
    if options.compile_layers:
        install_compiled_layers(model)
    plan_checkpointing(model, int(batch["input_ids"].numel()), policy.activation_budget_gb(options.max_activation_memory_gb))
