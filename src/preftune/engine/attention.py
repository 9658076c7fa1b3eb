"""Attention inputs of a laid-out batch, by attention kernel (see :mod:`preftune.engine.layout`)."""

from __future__ import annotations

import torch
from torch import nn

from preftune.engine.layout import build_attention_mask, build_block_mask


def _attn_implementation(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "sdpa"


def attention_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``attention_mask`` / ``position_ids`` for the decoder, by attention kernel.

    * unpacked rows: the 2-D padding mask (every kernel's fast causal path);
    * packed, sdpa: boolean 4-D mask; eager: additive 4-D mask;
    * packed, flex_attention: a ``BlockMask`` (masked blocks skipped);
    * packed, flash_attention_*: no mask, restarted ``position_ids`` (the kernel's varlen path).
      Flash kernels cannot express the shared-prompt mask: raises ``ValueError`` for a
      shared-prompt batch (use ``--share_prompt false`` or sdpa / flex_attention).
    """
    packed = bool(batch["packed"])
    impl = _attn_implementation(model)
    if not packed:
        return {"attention_mask": build_attention_mask(batch["segment_ids"], batch["branch_ids"], packed=False)}
    if impl.startswith("flash"):
        if bool((batch["branch_ids"] != 0).any()):
            raise ValueError(f"--share_prompt needs an attention kernel that takes a custom mask (sdpa, eager, "
                             f"flex_attention); {impl} does not. Use --share_prompt false with {impl}.")
        return {"attention_mask": None, "position_ids": batch["position_ids"]}
    if impl == "flex_attention":
        mask = build_block_mask(batch["segment_ids"], batch["branch_ids"])
    else:
        dtype = next(model.parameters()).dtype if impl == "eager" else None
        mask = build_attention_mask(batch["segment_ids"], batch["branch_ids"], packed=True, additive_dtype=dtype)
    return {"attention_mask": mask, "position_ids": batch["position_ids"]}
