"""A fused LoRA epilogue (``--fused_lora``, experimental): ``base(x) + s · B(A(x))`` as one ``addmm``.

peft computes ``result = result + lora_B(lora_A(dropout(x))) * scaling`` for every adapted linear
layer: the rank-r product, then a multiplication and an addition over the full ``(tokens, out)``
output, forward and backward (Hu et al. 2021, "LoRA", eq. 3: ``h = W0 x + (alpha/r) B A x``).
:func:`install_fused_lora` gives each vanilla adapter (one active adapter, no variant such as
DoRA, a plain ``nn.Linear`` base, no bias on ``lora_B``) a forward that accumulates the scaled
product into the base output with ``torch.addmm(result, A(x), Bᵀ, alpha=scaling)``: the same sum,
two full-size elementwise passes less in the forward and one in the backward. Anything else
(merged or disabled adapters, mixed-adapter batches, extra arguments) runs peft's own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    peft_forward = type(self).forward
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return peft_forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    if (name not in self.lora_A or name in getattr(self, "lora_variant", {})
            or not isinstance(self.lora_dropout[name], nn.Identity) or self.lora_B[name].bias is not None
            or type(self.base_layer) is not nn.Linear):
        return peft_forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    a = lora_a(self._cast_input_dtype(x, lora_a.weight.dtype))
    n = result.shape[-1]
    out = torch.addmm(result.reshape(-1, n), a.reshape(-1, a.shape[-1]).to(result.dtype),
                      lora_b.weight.t().to(result.dtype), alpha=self.scaling[name])
    return out.view(result.shape)


def install_fused_lora(model: nn.Module, enabled: bool = True) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` the fused forward (``enabled``) or peft's own
    back (not ``enabled``); returns the number of layers changed. Idempotent."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        has = "forward" in vars(module)
        if enabled and not has:
            module.forward = types.MethodType(_fused_forward, module)
            changed += 1
        elif not enabled and has:
            del module.forward
            changed += 1
    return changed
