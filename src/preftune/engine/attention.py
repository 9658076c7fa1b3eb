"""Attention inputs of a laid-out batch, by attention kernel (see :mod:`preftune.engine.layout`).

With SDPA (the default ``--attn_implementation``) the engine computes attention itself, blockwise
(:mod:`preftune.engine.block_attention`): the decoder gets a zero-memory placeholder 4-D mask that
carries the batch's :class:`~preftune.engine.block_attention.BlockLayout`, and transformers'
``"sdpa"`` attention function is wrapped once so that it hands such calls to
:func:`~preftune.engine.block_attention.block_attention` (every other call goes to the original
function unchanged). Nothing of size ``T × T`` is built or kept for the backward.
``--packed_attention mask`` restores the materialised 4-D mask.
"""

from __future__ import annotations

import torch
from torch import nn

from preftune.engine.block_attention import BlockLayout, block_attention, build_block_layout
from preftune.engine.layout import build_attention_mask, build_block_mask
from preftune.engine.options import engine_options


def _attn_implementation(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "sdpa"


def _placeholder_mask(layout: BlockLayout, device) -> torch.Tensor:
    """A ``(rows, 1, T, T)`` all-true boolean view of one element (no memory) carrying ``layout``.

    transformers passes a 4-D mask to the attention function as is; the wrapped ``"sdpa"`` reads
    ``preftune_layout`` from it. Any other consumer would see "attend everywhere", so the wrapper
    refuses a placeholder that lost its layout (see :func:`_install_sdpa_wrapper`).
    """
    rows, t = layout.segment_ids.shape
    mask = torch.ones((), dtype=torch.bool, device=device).expand(rows, 1, t, t)
    mask.preftune_layout = layout
    return mask


def _is_placeholder(mask) -> bool:
    return (isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.dtype == torch.bool
            and mask.numel() > 1 and all(s == 0 for s in mask.stride()))


_UNSUPPORTED = ("softcap", "s_aux", "position_bias")


@torch.compiler.disable  # python loops over the layout: a graph break under --compile_layers, never traced
def _blockwise(query, key, value, layout, scaling, window):
    return block_attention(query, key, value, layout, scale=scaling, window=window)


def _install_sdpa_wrapper() -> None:
    """Wrap transformers' ``"sdpa"`` attention function once (idempotent)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(original, "_preftune_wrapper", False):
        return

    def sdpa_or_blockwise(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
        layout = getattr(attention_mask, "preftune_layout", None)
        if layout is None:
            if _is_placeholder(attention_mask):
                raise RuntimeError(
                    f"{type(module).__name__}: the attention mask reached SDPA without preftune's block layout "
                    "(the model copies or slices its mask); use --packed_attention mask")
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, **kwargs)
        if dropout:
            raise ValueError(f"{type(module).__name__}: attention dropout {dropout} is not supported by "
                             "--packed_attention blockwise; use --packed_attention mask")
        bad = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
        if bad:
            raise ValueError(f"{type(module).__name__}: attention with {', '.join(bad)} is not supported by "
                             "--packed_attention blockwise; use --packed_attention mask or eager attention")
        window = kwargs.get("sliding_window")
        return _blockwise(query, key, value, layout, scaling, window if window else None), None

    sdpa_or_blockwise._preftune_wrapper = True
    sdpa_or_blockwise.__wrapped__ = original
    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_or_blockwise


def attention_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``attention_mask`` / ``position_ids`` for the decoder, by attention kernel.

    * sdpa, ``--packed_attention blockwise`` (default), any layout: a placeholder mask carrying the
      batch's block layout (see the module docstring) and the layout's ``position_ids``;
    * unpacked rows otherwise: the 2-D padding mask (every kernel's fast causal path);
    * packed, sdpa with ``--packed_attention mask``: boolean 4-D mask; eager: additive 4-D mask;
    * packed, flex_attention: a ``BlockMask`` (masked blocks skipped);
    * packed, flash_attention_*: no mask, restarted ``position_ids`` (the kernel's varlen path).
      Flash kernels cannot express the shared-prompt mask: raises ``ValueError`` for a
      shared-prompt batch (use ``--share_prompt false`` or sdpa / flex_attention).
    """
    packed = bool(batch["packed"])
    impl = _attn_implementation(model)
    if impl == "sdpa" and engine_options(model).packed_attention == "blockwise":
        _install_sdpa_wrapper()
        config = getattr(model, "config", None)
        heads = getattr(config, "num_attention_heads", None) or 8
        layout = build_block_layout(batch["segment_ids"], batch["branch_ids"], batch["position_ids"], heads)
        return {"attention_mask": _placeholder_mask(layout, batch["input_ids"].device),
                "position_ids": batch["position_ids"]}
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
