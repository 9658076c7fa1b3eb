"""Mixture-of-experts: the router load-balancing auxiliary loss, in every batch layout.

Sparse MoE decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...) route each token to ``k`` of ``E``
experts. Their training loss adds a load-balancing term (Switch Transformer, Fedus et al. 2021,
arXiv 2101.03961, eqs. 4-6; Mixtral / transformers' ``load_balancing_loss_func``):

    aux = E * sum_e f_e * P_e,
    f_e = sum_{l,t} w_t * [e in topk(p_{l,t})] / sum_{l,t} w_t      (share of routed slots, sums to k)
    P_e = sum_{l,t} w_t * p_{l,t,e}            / sum_{l,t} w_t      (mean router probability)

over the MoE layers ``l`` and tokens ``t``, with ``p_{l,t} = softmax(router logits)`` and token
weights ``w_t``. transformers uses ``w_t`` = the 2-D attention mask (0 on padding).

**Which tokens count, and how often.** TRL 1.16 (``CPOTrainer.concatenated_forward``, and
``DPOTrainer``) computes this over the concatenated ``[P C]`` and ``[P R]`` rows, so a prompt token
is counted *twice* (once in each row) and padding never. preftune matches that convention in every
layout: ``w_t`` is 0 on padding, 2 on the prompt tokens of a shared-prompt unit ``[P C R]`` (computed
once, standing for both ``[P C]`` and ``[P R]``; their router logits are identical because the
prompt never sees the completions), and 1 elsewhere. Why this one: the auxiliary loss is then the
same number whatever ``--share_prompt`` / ``--padding_free`` say (the layout is an implementation
detail and never changes the loss), and equal to TRL's, so a run moved from TRL keeps its loss.
Counting the prompt once would weight long prompts half as much in the shared layout only.

Enabling: the term is used when the model's (text) config has ``output_router_logits=True`` and a
non-zero ``router_aux_loss_coef`` (as TRL's CPO / ORPO trainers), or when ``--router_aux_loss_coef``
is given > 0 for a model that has router logits (its value overrides the config's; 0 turns it off,
and then the router logits are not even requested). :func:`configure_router_aux` (through
:func:`preftune.engine.options.configure_engine`) records the flag on the model; the causal kind
calls :func:`router_aux_loss` and returns ``{"aux_loss": aux}`` with its weight
``{"aux_loss": coef}`` (:func:`router_aux_coef`) in ``extra_loss_weights``; the trainer adds
``coef * aux`` to every loss and logs ``aux_loss`` (unscaled, as TRL's DPOTrainer logs it).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from preftune.engine.layout import SHARED

_COEF_ATTR = "_preftune_router_aux_loss_coef"


def _text_config(model: nn.Module):
    from preftune.modeling import unwrap_peft

    config = getattr(unwrap_peft(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def has_router_logits(model: nn.Module) -> bool:
    """True when the model's (text) config declares ``output_router_logits`` (an MoE model that can
    return its router logits), whatever its value."""
    config = _text_config(model)
    return config is not None and hasattr(config, "output_router_logits")


def configure_router_aux(model: nn.Module, coef: Optional[float]) -> None:
    """Record ``--router_aux_loss_coef`` on ``model`` (None: the model config decides).

    Raises:
        ValueError: ``coef`` is non-finite or negative, or > 0 for a model without router logits
            (not a mixture of experts: there is no auxiliary loss to weight).
    """
    if coef is None:
        return
    if not math.isfinite(coef) or coef < 0:
        raise ValueError(f"--router_aux_loss_coef must be a finite number >= 0, got {coef}")
    if coef > 0 and not has_router_logits(model):
        from preftune.modeling import unwrap_peft

        base = unwrap_peft(model)
        model_type = getattr(getattr(base, "config", None), "model_type", "?")
        raise ValueError(f"--router_aux_loss_coef {coef}: {type(base).__name__} (model_type {model_type!r}) is not a "
                         "mixture-of-experts model with router logits, so there is no auxiliary loss to weight")
    setattr(model, _COEF_ATTR, float(coef))


def router_aux_coef(model: nn.Module) -> float:
    """The weight of the auxiliary loss for ``model``: the recorded flag, else the config's
    ``router_aux_loss_coef`` when ``output_router_logits`` is true, else 0."""
    coef = getattr(model, _COEF_ATTR, None)
    if coef is not None:
        return coef
    config = _text_config(model)
    if config is None or not getattr(config, "output_router_logits", False):
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def router_aux_enabled(model: nn.Module) -> bool:
    """Whether the decoder must return router logits for an auxiliary loss (coefficient > 0)."""
    return has_router_logits(model) and router_aux_coef(model) > 0


def _experts(model: nn.Module) -> tuple[int, int]:
    """``(E, k)``: number of routed experts and experts per token."""
    from preftune.modeling import unwrap_peft

    base = unwrap_peft(model)
    config = _text_config(model)
    num = getattr(base, "num_experts", None)
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        num = num or getattr(config, name, None)
    top_k = getattr(base, "num_experts_per_tok", None) or getattr(config, "num_experts_per_tok", None)
    if not num or not top_k:
        raise ValueError(f"{type(base).__name__}: cannot tell the number of experts / experts per token from its "
                         "config (num_local_experts / num_experts, num_experts_per_tok)")
    return int(num), int(top_k)


def token_weights(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(rows*T,)`` float32 weight of each laid-out position in the auxiliary loss (module docstring):
    0 on padding, 2 on the prompt of a shared-prompt unit, 1 elsewhere."""
    seg, br = batch["segment_ids"], batch["branch_ids"]
    rows, width = seg.shape
    nseg = int(seg.max().item()) + 1 if seg.numel() else 1
    key = torch.arange(rows, device=seg.device)[:, None] * nseg + seg.clamp(min=0)
    # a unit whose tokens carry chosen / rejected branches is a shared-prompt unit [P C R]
    shared_unit = torch.zeros(rows * nseg, dtype=torch.bool, device=seg.device)
    shared_unit[key[(seg >= 0) & (br != SHARED)]] = True
    doubled = (br == SHARED) & shared_unit[key]
    w = torch.where(doubled, 2.0, 1.0) * (seg >= 0)
    return w.reshape(-1).float()


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        weights: torch.Tensor) -> torch.Tensor:
    """The weighted load-balancing loss of the module docstring, a float32 scalar.

    ``router_logits``: one ``(N, E)`` tensor per MoE layer (``N`` = rows*T laid-out positions);
    ``weights``: ``(N,)`` per-position weights. With ``weights`` = a 0/1 attention mask this is
    transformers' ``load_balancing_loss_func``.

    Raises:
        ValueError: no router logits, or a layer's logits do not have ``N`` rows.
    """
    if not router_logits:
        raise ValueError("the model returned no router logits")
    device = router_logits[0].device
    w = weights.to(device=device, dtype=torch.float32)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    for layer in router_logits:
        layer = layer.reshape(-1, layer.shape[-1])
        if layer.shape[0] != w.shape[0]:
            raise ValueError(f"router logits of {layer.shape[0]} positions for a batch of {w.shape[0]}")
        p = torch.softmax(layer.to(device).float(), dim=-1)
        chosen = torch.topk(p, top_k, dim=-1).indices
        counts = counts.scatter_add(0, chosen.reshape(-1), w.repeat_interleave(top_k))
        probs = probs + (p * w[:, None]).sum(0)
    total = w.sum() * len(router_logits)
    return num_experts * torch.sum((counts / total) * (probs / total))


def router_aux_loss(model: nn.Module, outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The auxiliary loss of one decoder pass over a laid-out batch (float32 scalar, unweighted).

    ``outputs``: the decoder's output, run with ``output_router_logits=True`` (its
    ``router_logits``: a tuple of ``(rows*T, E)`` per MoE layer).

    Raises:
        ValueError: the decoder returned no router logits.
    """
    logits = getattr(outputs, "router_logits", None)
    if not logits:
        from preftune.modeling import unwrap_peft

        raise ValueError(f"{type(unwrap_peft(model)).__name__}: output_router_logits=True returned no router logits; "
                         "the auxiliary loss cannot be computed (set --router_aux_loss_coef 0 to train without it)")
    num_experts, top_k = _experts(model)
    return load_balancing_loss(tuple(logits), num_experts, top_k, token_weights(batch))
