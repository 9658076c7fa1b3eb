"""LoRA dropout without copies of the input kept for the backward.

peft computes ``lora_B(lora_A(dropout(x)))`` for every adapted linear layer. On CPU,
``torch.nn.Dropout`` in training keeps a float32 noise tensor of the input's size, and ``lora_A``
keeps its input ``dropout(x)``, a second full-size copy: two copies of ``x`` per adapter, 14 per
Llama layer (q, k, v share one ``x``, gate and up another), which with ``--lora_dropout 0.05``
took 49% of the activations saved for the backward of SmolLM2 (measured in docs/performance.md).

:func:`fuse_lora_dropout` gives each such adapter one fused ``dropout → lora_A`` step
(:class:`DropoutLinear`): the forward draws the dropout mask from a seed, the backward redraws
it from the same seed, and only ``x`` is kept — the tensor the adapters of the same input keep
anyway. Same distribution as peft (Bernoulli keep-probability ``1 - p``, kept values scaled by
``1 / (1 - p)``; Srivastava et al. 2014, "Dropout", eq. 1 with inverted scaling), an independent
mask per adapter and per call; the state-dict keys, the adapter config and merging are unchanged.
The keep-probability is ``1 - p`` rounded to a multiple of 2^-16 (the mask is drawn as 16-bit
integers from numpy's PCG64 generator; see :func:`_keep`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from preftune.device import DevicePolicy

#: resolution of the keep decision: one uniform 16-bit integer per element
_LEVELS = 1 << 16


def _keep(x: torch.Tensor, p: float, seed: int) -> tuple[torch.Tensor, float]:
    """Keep decisions for the elements of ``x`` drawn from ``seed`` (reproducible), and their scale.

    Returns ``(keep, scale)``: ``keep`` is a bool tensor of ``x``'s shape, True with probability
    ``q = round((1 - p) · 65536) / 65536`` independently per element (``|q - (1 - p)| ≤ 7.7e-6``),
    and ``scale = 1 / q``, so ``E[keep · scale] = 1`` exactly (inverted dropout).

    Where the bits come from is the device policy's choice
    (:meth:`preftune.device.DevicePolicy.host_dropout_masks`): for a CPU tensor numpy's PCG64
    generator (``random_raw``: 64 raw bits give four 16-bit draws; faster than torch's serial CPU
    ``bernoulli_``, docs/performance.md), for a GPU tensor a torch generator on its device
    (``DevicePolicy.dropout_generator``), both seeded with ``seed``.
    """
    q_levels = round((1.0 - p) * _LEVELS)
    if not DevicePolicy.host_dropout_masks(x):  # a GPU tensor: drawn on its device, no host work or copy
        generator = DevicePolicy.dropout_generator(x, seed)
        draws = torch.randint(-_LEVELS // 2, _LEVELS // 2, x.shape, generator=generator, device=x.device,
                              dtype=torch.int32)
        return draws < (q_levels - _LEVELS // 2), _LEVELS / q_levels
    n = x.numel()
    raw = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw((n + 3) // 4)
    draws = torch.from_numpy(raw.view(np.int16)[:n]).view(x.shape)  # uniform on [-32768, 32767]
    return draws < (q_levels - _LEVELS // 2), _LEVELS / q_levels


def _mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Keep-mask of ``x``'s shape and dtype scaled by ``1 / q`` (see :func:`_keep`), drawn from
    ``seed`` (reproducible): the explicit form of the mask the fused path applies."""
    keep, scale = _keep(x, p, seed)
    return keep.to(x.dtype) * scale


class _DropoutLinearFn(torch.autograd.Function):
    """``F.linear(x · mask, W, b)`` with the mask redrawn from its seed in the backward.

    The scale ``1 / q`` is applied to the rank-``r`` output (forward) and to ``grad_out``
    (backward) instead of the ``x``-sized tensors: the same values, fewer element-wise passes."""

    @staticmethod
    def forward(ctx, x, weight, bias, p: float, seed: int):
        keep, scale = _keep(x, p, seed)
        out = F.linear(torch.where(keep, x, 0.0), weight).mul_(scale)
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed, ctx.has_bias = p, seed, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        keep, scale = _keep(x, ctx.p, ctx.seed)
        grad_x = grad_w = grad_b = None
        scaled = grad_out * scale
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(keep, scaled @ weight.to(grad_out.dtype), 0.0)
        if ctx.needs_input_grad[1]:
            g2 = scaled.reshape(-1, grad_out.shape[-1])
            xm = torch.where(keep, x, 0.0).reshape(-1, x.shape[-1])
            grad_w = (g2.t() @ xm.to(g2.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None, None


@torch.compiler.disable  # the per-call seed and generator stay outside compiled graphs
def _fused_dropout_linear(x, weight, bias, p: float) -> torch.Tensor:
    seed = int(torch.randint(0, 2 ** 62, (), device="cpu"))
    return _DropoutLinearFn.apply(x, weight, bias, p, seed)


class DropoutLinear(nn.Linear):
    """``nn.Linear`` applied to ``dropout(x, p)``, keeping only ``x`` for the backward.

    A drop-in class for a LoRA ``lora_A`` layer (same parameters and state-dict keys). In eval
    mode, with ``p == 0`` or without grad it is ``F.linear(dropout(x))`` / ``F.linear(x)``.
    The seed of each training call is drawn from torch's default generator, so ``set_seed``
    reproduces a run and activation checkpointing (which restores the RNG state before
    recomputing) redraws the same mask.

    Args: as ``nn.Linear``; ``p`` (attribute ``dropout_p``) in ``[0, 1)``.
    """

    dropout_p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout_p
        if not self.training or p == 0.0:
            return F.linear(x, self.weight, self.bias)
        if not torch.is_grad_enabled():
            return F.linear(F.dropout(x, p, True), self.weight, self.bias)
        return _fused_dropout_linear(x, self.weight, self.bias, p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout_p={self.dropout_p}"


def fuse_lora_dropout(model: nn.Module) -> nn.Module:
    """Replace every vanilla LoRA adapter's ``lora_dropout`` (``nn.Dropout(p > 0)``) + ``lora_A``
    by ``nn.Identity`` + :class:`DropoutLinear` (in place; idempotent); returns ``model``.

    Adapters with a peft variant (DoRA, ...) keep peft's own path. Returns the number of fused
    adapters in ``model._preftune_fused_lora_dropout``.
    """
    fused = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(drops, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        for name, drop in list(drops.items()):
            a = lora_a[name] if name in lora_a else None
            if not isinstance(drop, nn.Dropout) or drop.p == 0 or name in variants or a is None:
                continue
            if type(a) is not nn.Linear:
                continue
            a.__class__ = DropoutLinear
            a.dropout_p = float(drop.p)
            drops[name] = nn.Identity()
            fused += 1
    model._preftune_fused_lora_dropout = getattr(model, "_preftune_fused_lora_dropout", 0) + fused
    return model
