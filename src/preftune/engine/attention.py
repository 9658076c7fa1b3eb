"""Attention inputs of a laid-out batch, by attention kernel (see :mod:`preftune.engine.layout`).

Which kernel computes a batch's attention is decided in one place, :func:`attention_path`, from the
model's ``--attn_implementation``, the layout (packed / shared prompt), ``--packed_attention`` and the
device (:class:`preftune.device.DevicePolicy`; forced with ``configure_engine(model,
attention_device=...)``):

* ``padding``: the model's own kernel with the 2-D padding mask (unpacked rows: SDPA's flash /
  memory-efficient backends on a GPU, flash-attn's unpadding, eager's causal mask);
* ``blockwise`` (the CPU path of sdpa, every batch): preftune's blockwise attention
  (:mod:`preftune.engine.block_attention`): the decoder gets a zero-memory placeholder 4-D mask that
  carries the batch's :class:`~preftune.engine.block_attention.BlockLayout`, and transformers'
  attention function is wrapped once so that it hands such calls to
  :func:`~preftune.engine.block_attention.block_attention` (every other call goes to the original
  function unchanged). Nothing of size ``T × T`` is built or kept for the backward;
* ``flex`` (packed or shared-prompt rows on a GPU with sdpa; shared-prompt rows with a flash kernel):
  the same placeholder carries a :class:`FlexLayout` and the wrapped function runs
  ``torch.nn.attention.flex_attention`` (compiled on CUDA) with the layout's ``BlockMask``;
* ``flex_native`` (``--attn_implementation flex_attention`` on a GPU): the ``BlockMask`` as the mask
  (on the CPU, where FlexAttention has no backward in torch 2.13, ``blockwise`` instead);
* ``mask``: the materialised 4-D mask (``--packed_attention mask``: boolean; eager: additive);
* ``varlen`` (packed rows without a shared prompt, flash kernels): no mask, and the varlen
  boundaries of the units (:func:`preftune.engine.layout.varlen_boundaries`) as ``cu_seq_lens_q/k``
  and ``max_length_q/k``, which transformers passes to ``flash_attn_varlen_func``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from preftune.device import DevicePolicy
from preftune.engine.block_attention import BlockLayout, block_attention, build_block_layout
from preftune.engine.layout import build_attention_mask, build_block_mask, make_mask_mod, varlen_boundaries
from preftune.engine.options import EngineOptions, engine_options

logger = logging.getLogger("preftune.engine")

PATHS = ("padding", "blockwise", "flex", "flex_native", "mask", "varlen")


def _attn_implementation(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "sdpa"


def is_flash(impl: str) -> bool:
    """A flash-attn kernel (``flash_attention_2/3/4``, a Hub kernel, any registered name with "flash"):
    the rule of transformers' ``is_flash_attention_requested``."""
    return "flash" in impl


def attention_path(impl: str, *, packed: bool, shared: bool, options: EngineOptions, policy: DevicePolicy) -> str:
    """The attention path of one batch (one of :data:`PATHS`, see the module docstring).

    ``impl``: the model's ``_attn_implementation``; ``packed``: the batch needs more than a padding
    mask (several units per row or a shared prompt); ``shared``: some unit is ``[P C R]`` (its
    rejected tokens must not see the chosen ones: not a set of causal sequences); ``policy``: the
    device's policy (its ``is_cuda`` picks maintained kernels on a GPU, the blockwise loop on the CPU).
    """
    if is_flash(impl):
        if not packed:
            return "padding"
        if not shared:
            return "varlen"
        return "flex" if policy.is_cuda else "blockwise"
    if impl == "sdpa" and options.packed_attention == "blockwise":
        if policy.is_cuda:
            return "flex" if packed else "padding"
        return "blockwise"  # the CPU: every batch, as measured in docs/performance.md
    if impl == "flex_attention" and not policy.is_cuda:
        return "blockwise"  # FlexAttention has no CPU backward (torch 2.13): the CPU's kernel instead
    if not packed:
        return "padding"
    return "flex_native" if impl == "flex_attention" else "mask"


def _policy(model: nn.Module, batch: dict[str, torch.Tensor]) -> DevicePolicy:
    """The device policy of the batch's device, or of ``attention_device`` when an option forces one
    (built without asking CUDA anything: only ``is_cuda`` is read)."""
    forced = engine_options(model).attention_device
    return DevicePolicy(torch.device(forced) if forced else batch["input_ids"].device)


@dataclass
class FlexLayout:
    """A batch's rule for FlexAttention: ``segment_ids`` / ``branch_ids`` / ``position_ids`` ``(rows, T)``
    and one ``BlockMask`` per sliding window (None: none), built at the first layer that asks."""

    segment_ids: torch.Tensor
    branch_ids: torch.Tensor
    position_ids: torch.Tensor
    masks: dict = field(default_factory=dict)
    calls: int = 0

    def block_mask(self, window: Optional[int]):
        """The ``BlockMask`` of :func:`preftune.engine.layout.attend` (and, with a sliding ``window``,
        only keys less than ``window`` positions back), built by ``create_block_mask`` (compiled on
        CUDA: no ``T × T`` tensor) once per window."""
        if window not in self.masks:
            from torch.nn.attention.flex_attention import create_block_mask

            seg, br, pos = self.segment_ids, self.branch_ids, self.position_ids
            rule = make_mask_mod(seg, br)

            def mask_mod(b, h, q, k):
                return rule(b, h, q, k) & (pos[b, q] - pos[b, k] < window)

            rows, t = seg.shape
            self.masks[window] = create_block_mask(rule if window is None else mask_mod, rows, None, t, t,
                                                   device=seg.device, _compile=_compiled(seg.device))
        return self.masks[window]


_COMPILED_FLEX = []


def _compiled(device: torch.device) -> bool:
    """FlexAttention and its ``BlockMask`` are compiled (Triton) on CUDA tensors, eager elsewhere."""
    return DevicePolicy(torch.device(device)).is_cuda


def _flex_function(device: torch.device):
    """``flex_attention``, compiled once on CUDA (its fused Triton kernel); eager elsewhere (the
    reference implementation, forward only on the CPU in torch 2.13: tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not _compiled(device):
        return flex_attention
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention))
    return _COMPILED_FLEX[0]


def flex_layout_attention(query, key, value, layout: FlexLayout, scaling: Optional[float], window: Optional[int]):
    """Attention of a laid-out batch by FlexAttention (Dong et al. 2024, "Flex Attention") under the
    layout's ``BlockMask``: ``query`` ``(rows, Hq, T, D)``, ``key`` / ``value`` ``(rows, Hkv, T, D)``
    (grouped-query heads: ``enable_gqa``); ``scaling`` default ``D ** -0.5``. Returns ``(rows, T, Hq, D)``."""
    layout.calls += 1
    out = _flex_function(query.device)(query, key.to(query.dtype), value.to(query.dtype),
                                       block_mask=layout.block_mask(window), scale=scaling,
                                       enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()


def _placeholder_mask(layout, device) -> torch.Tensor:
    """A ``(rows, 1, T, T)`` all-true boolean view of one element (no memory) carrying ``layout``
    (a :class:`BlockLayout` or a :class:`FlexLayout`).

    transformers passes a 4-D mask to the attention function as is; the wrapped function reads
    ``preftune_layout`` from it. Any other consumer would see "attend everywhere", so the wrapper
    refuses a placeholder that lost its layout (see :func:`_install_wrapper`).
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


def _install_wrapper(impl: str) -> None:
    """Wrap transformers' attention function ``impl`` once (idempotent): a call whose mask carries a
    layout goes to the blockwise or the FlexAttention path, every other call to the original.

    The wrapped function raises ``RuntimeError`` for a placeholder mask without its layout (the
    model copied or sliced it) and ``ValueError`` for attention dropout, softcap, attention sinks
    or a position bias (not supported by either path).
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS[impl]
    if getattr(original, "_preftune_wrapper", False):
        return

    def attention_or_layout(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
        layout = getattr(attention_mask, "preftune_layout", None)
        if layout is None:
            if _is_placeholder(attention_mask):
                raise RuntimeError(
                    f"{type(module).__name__}: the attention mask reached {impl} without preftune's block layout "
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
        window = kwargs.get("sliding_window") or None
        if isinstance(layout, FlexLayout):
            return flex_layout_attention(query, key, value, layout, scaling, window), None
        return _blockwise(query, key, value, layout, scaling, window), None

    attention_or_layout._preftune_wrapper = True
    attention_or_layout.__wrapped__ = original
    ALL_ATTENTION_FUNCTIONS[impl] = attention_or_layout


def _install_sdpa_wrapper() -> None:
    """:func:`_install_wrapper` for ``"sdpa"``."""
    _install_wrapper("sdpa")


def _note_once(model: nn.Module, impl: str, path: str) -> None:
    """One log line (once per model) where the kernel asked for is not the one that runs: a shared-prompt
    batch under a flash kernel, or ``flex_attention`` on the CPU."""
    if getattr(model, "_preftune_attention_noted", False):
        return
    kernel = "FlexAttention" if path == "flex" else "preftune's blockwise attention (CPU)"
    if is_flash(impl):
        logger.warning("--attn_implementation %s with --share_prompt true: flash kernels cannot keep the rejected "
                       "tokens of a shared-prompt unit [P C R] from the chosen ones, so shared-prompt batches run "
                       "in %s instead (--share_prompt false keeps every batch on %s's varlen path)", impl, kernel,
                       impl)
    else:
        logger.warning("--attn_implementation %s on the CPU: attention runs in %s (FlexAttention has no CPU "
                       "backward in torch %s)", impl, kernel, torch.__version__.split("+")[0])
    model._preftune_attention_noted = True


def attention_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, object]:
    """The decoder's attention keyword arguments for a laid-out batch, by :func:`attention_path`.

    * ``padding``: ``attention_mask`` the 2-D padding mask ``(rows, T)``;
    * ``blockwise`` / ``flex``: a placeholder mask carrying the batch's layout and the layout's
      ``position_ids`` (the attention function ``impl`` is wrapped, :func:`_install_wrapper`);
    * ``mask``: boolean (sdpa) or additive (eager, in the weights' dtype) 4-D mask, ``position_ids``;
    * ``flex_native``: a ``BlockMask`` (masked blocks skipped), ``position_ids``;
    * ``varlen``: ``attention_mask`` None, ``position_ids``, ``cu_seq_lens_q`` / ``cu_seq_lens_k``
      ``(n+1,)`` int32 and ``max_length_q`` / ``max_length_k`` (int) over the rows read flat
      (:func:`preftune.engine.layout.varlen_boundaries`). transformers derives boundaries from
      ``position_ids`` only at batch size 1; with these it runs ``flash_attn_varlen_func`` on every
      row count.

    A shared-prompt batch under a flash kernel runs in FlexAttention (GPU) or blockwise (CPU), and
    ``flex_attention`` on the CPU in blockwise: said once in the log (:func:`_note_once`).
    """
    packed = bool(batch["packed"])
    shared = packed and bool((batch["branch_ids"] != 0).any())
    impl = _attn_implementation(model)
    options = engine_options(model)
    path = attention_path(impl, packed=packed, shared=shared, options=options, policy=_policy(model, batch))
    if (is_flash(impl) and shared) or (impl == "flex_attention" and path == "blockwise"):
        _note_once(model, impl, path)
    seg, br, pos = batch["segment_ids"], batch["branch_ids"], batch["position_ids"]
    if path == "padding":
        return {"attention_mask": build_attention_mask(seg, br, packed=False)}
    if path in ("blockwise", "flex"):
        _install_wrapper(impl)
        if path == "flex":
            layout = FlexLayout(seg, br, pos)
            layout.block_mask(None)  # here, before the decoder (outside --compile_layers' graphs)
        else:
            heads = getattr(getattr(model, "config", None), "num_attention_heads", None) or 8
            layout = build_block_layout(seg, br, pos, heads)
        return {"attention_mask": _placeholder_mask(layout, batch["input_ids"].device), "position_ids": pos}
    if path == "varlen":
        cu_seqlens, max_len = varlen_boundaries(seg)
        return {"attention_mask": None, "position_ids": pos, "cu_seq_lens_q": cu_seqlens,
                "cu_seq_lens_k": cu_seqlens, "max_length_q": max_len, "max_length_k": max_len}
    if path == "flex_native":
        return {"attention_mask": build_block_mask(seg, br), "position_ids": pos}
    dtype = next(model.parameters()).dtype if impl == "eager" else None
    return {"attention_mask": build_attention_mask(seg, br, packed=True, additive_dtype=dtype), "position_ids": pos}


__all__ = ["BlockLayout", "FlexLayout", "PATHS", "attention_inputs", "attention_path", "flex_layout_attention",
           "is_flash"]
