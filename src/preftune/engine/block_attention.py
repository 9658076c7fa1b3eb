"""Blockwise attention for laid-out batches: no ``T × T`` tensor is kept for the backward.

The layouts of :mod:`preftune.engine.layout` need a mask that is neither plain causal nor
padding-only: packed units are block-diagonal, and in a shared-prompt unit ``[P C R]`` the
rejected tokens must not see the chosen ones. Handed to ``torch.nn.functional.scaled_dot_product_attention``
as a 4-D boolean mask, such a mask costs ``T²`` per row twice: SDPA on CPU converts it to a float
additive mask that its fused kernel saves for the backward, in every layer (measured: 32 MiB per
layer for 2 rows of 2048 tokens, 0.94 GiB for SmolLM2's 30 layers; 15 GiB at 8192 tokens).

This module computes the same attention with the online-softmax algorithm of FlashAttention
(Dao et al. 2022, "FlashAttention", Alg. 1; the backward of Dao 2023, "FlashAttention-2",
Alg. 2) in plain PyTorch, one block of ``block_q`` queries at a time:

* forward, per query block: scores ``S = Q Kᵀ · scale`` over the keys the block can see, the
  mask rule evaluated from the per-token ``segment_ids`` / ``branch_ids`` (never stored as a
  matrix), ``P = softmax(S)``, ``O = P V``; only ``O`` and the row log-sum-exp ``L`` are kept;
* backward, per block: ``P = exp(S − L)`` recomputed, ``dV += Pᵀ dO``, ``dP = dO Vᵀ``,
  ``dS = P ⊙ (dP − rowsum(dO ⊙ O))``, ``dQ = dS K · scale``, ``dK += dSᵀ Q · scale``.

This is the CPU's path (:func:`preftune.engine.attention.attention_path`; a GPU runs SDPA or
FlexAttention). On CPU each block runs in PyTorch's fused flash-attention kernel for CPU
(``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward, which return and take
the log-sum-exp), with an additive mask of that block only (at most 2^22 entries, built from the
ids and freed after the call); elsewhere, or when the op is missing, the algorithm above runs in
plain PyTorch, with the scores accumulated and stored in float32 for half-precision inputs
(fp16 ``Q Kᵀ`` overflows past 65504 before the scale). Measured here, forward + backward of one
SmolLM2 layer's attention, 2 rows × 1024 (2048) tokens of the shared-prompt layout, CPU seconds: 0.65 (1.89) with the fused kernel per
block, 0.91 (2.25) in plain PyTorch, 0.71 (2.84) for SDPA with the full 4-D mask.

Saved for the backward: ``Q``, ``K``, ``V`` (grouped-query heads *not* repeated), ``O`` (the very
tensor returned, which the output projection saves too) and ``L`` (one float per head and token).
Key blocks that no query of a block can see (other units of the row, the chosen branch for a
rejected block) are skipped. Exact up to float rounding (tests compare it with eager attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from preftune.engine.layout import attend

#: scores per block (heads × block_q × keys) of the plain-PyTorch path: 2^23 floats
BLOCK_ELEMENTS = 2 ** 23
#: mask entries per block (block_q × keys) of the fused CPU path: 2^22 floats (16 MiB)
FLASH_MASK_ELEMENTS = 2 ** 22


def _flash_ops():
    """The fused CPU flash-attention forward / backward ops, or None when this torch lacks them."""
    try:
        return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
    except (AttributeError, RuntimeError):
        return None


def use_flash(device: torch.device) -> bool:
    """True when blocks on ``device`` run in the fused CPU flash kernel (a CPU, and this torch has it)."""
    return torch.device(device).type == "cpu" and _flash_ops() is not None


@dataclass
class BlockLayout:
    """Which keys every query block of every row sees; built once per forward, shared by all layers.

    ``segment_ids`` / ``branch_ids`` / ``position_ids``: ``(rows, T)`` int64 (see
    :func:`preftune.engine.layout.collate_pairs`). ``blocks[r]``: ``(q_start, q_end, keys)`` with
    ``keys`` a ``slice`` of key positions or a ``(W,)`` int64 index of them.
    """

    segment_ids: torch.Tensor
    branch_ids: torch.Tensor
    position_ids: torch.Tensor
    block_q: int
    flash: bool = False  # blocks run in the fused CPU kernel
    blocks: list[list[tuple[int, int, Union[slice, torch.Tensor]]]] = field(default_factory=list)
    calls: int = 0  # attention calls served (a check that the model passed the layout through)


def _allowed(layout: BlockLayout, r: int, qs: int, qe: int, keys, window: Optional[int]) -> torch.Tensor:
    """``(qe-qs, W)`` bool: query ``i`` sees key ``j`` (:func:`preftune.engine.layout.attend`, and with a
    sliding ``window`` only keys less than ``window`` positions back; a padding query's own position
    is always inside)."""
    seg, br, pos = layout.segment_ids[r], layout.branch_ids[r], layout.position_ids[r]
    dev = seg.device
    q_idx = torch.arange(qs, qe, device=dev)[:, None]
    k_idx = (torch.arange(keys.start, keys.stop, device=dev) if isinstance(keys, slice) else keys)[None, :]
    ok = attend(q_idx, k_idx, seg[qs:qe, None], seg[k_idx], br[qs:qe, None], br[k_idx])
    if window is not None:
        ok &= (pos[qs:qe, None] - pos[k_idx]) < window
    return ok


def build_block_layout(segment_ids: torch.Tensor, branch_ids: torch.Tensor, position_ids: torch.Tensor,
                       num_heads: int, block_q: Optional[int] = None, flash: Optional[bool] = None) -> BlockLayout:
    """Split every row into query blocks and find the keys each block sees.

    ``flash`` (default: on CPU when the op exists): blocks run in the fused CPU kernel.
    ``block_q`` (default: about :data:`FLASH_MASK_ELEMENTS` mask entries per block, or with the
    plain-PyTorch path :data:`BLOCK_ELEMENTS` scores for ``num_heads`` heads; between 64 and ``T``
    queries). A block's keys run from the start of the unit of its first query to its last query;
    a run of keys no query of the block sees (the chosen branch, seen from a rejected block) is cut
    out when it is at least a quarter of that range.
    """
    rows, t = segment_ids.shape
    if flash is None:
        flash = use_flash(segment_ids.device)
    if block_q is None:
        per = FLASH_MASK_ELEMENTS // max(1, t) if flash else BLOCK_ELEMENTS // max(1, num_heads * t)
        block_q = max(64, min(t, per))
    layout = BlockLayout(segment_ids, branch_ids, position_ids, block_q, flash)
    seg_cpu = segment_ids.cpu()
    for r in range(rows):
        seg = seg_cpu[r]
        change = torch.ones(t, dtype=torch.bool)
        change[1:] = seg[1:] != seg[:-1]
        start = torch.cummax(torch.where(change, torch.arange(t), 0), 0).values  # first position of each unit
        blocks = []
        for qs in range(0, t, block_q):
            qe = min(t, qs + block_q)
            lo = int(start[qs])
            keys: Union[slice, torch.Tensor] = slice(lo, qe)
            if qe - lo > block_q:  # look for keys nobody in the block sees (chosen keys of rejected queries)
                seen = _allowed(layout, r, qs, qe, keys, None).any(0)
                n_seen = int(seen.sum())
                if n_seen <= 0.75 * (qe - lo):
                    keys = torch.nonzero(seen).squeeze(1).add_(lo).to(segment_ids.device)
            blocks.append((qs, qe, keys))
        layout.blocks.append(blocks)
    return layout


def _take(x: torch.Tensor, keys) -> torch.Tensor:
    """Keys ``(Hkv, T, D)`` → ``(Hkv, W, D)`` at ``keys`` (a view for a slice)."""
    return x[:, keys] if isinstance(keys, slice) else x.index_select(1, keys)


def _block_mask(layout: BlockLayout, r: int, qs: int, qe: int, keys, window, dtype) -> torch.Tensor:
    """``(1, 1, n, W)`` additive mask (0 / -inf) of one block, for the fused kernel."""
    ok = _allowed(layout, r, qs, qe, keys, window)
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, -math.inf)[None, None]


def _take_heads(x: torch.Tensor, keys) -> torch.Tensor:
    """``(1, H, T, D)`` → ``(1, H, W, D)`` at ``keys``."""
    return x[:, :, keys] if isinstance(keys, slice) else x.index_select(2, keys)


def _scores(qb: torch.Tensor, kb: torch.Tensor, acc: torch.dtype, scale: float) -> torch.Tensor:
    """Scaled scores ``S = Q Kᵀ · scale`` (Vaswani et al. 2017, eq. 1) of one block, ``(Hkv, n, W)`` in
    ``acc`` (float32 for half inputs): the product is accumulated and stored in float32 before the
    scale, so fp16 ``Q Kᵀ`` beyond 65504 does not overflow to ``inf`` (float32 inputs: unchanged)."""
    return torch.matmul(qb.to(acc), kb.to(acc).transpose(1, 2)).mul_(scale)


def _flash_forward(q, k, v, layout: BlockLayout, scale: float, window):
    fwd, _ = _flash_ops()
    rows, hq, t, d = q.shape
    rep = hq // k.shape[1]
    out = q.new_empty(rows, t, hq, d)
    lse = torch.empty(rows, hq, t, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    for r in range(rows):
        kr, vr = k[r:r + 1].repeat_interleave(rep, 1), v[r:r + 1].repeat_interleave(rep, 1)
        for qs, qe, keys in layout.blocks[r]:
            mask = _block_mask(layout, r, qs, qe, keys, window, q.dtype)
            o, lb = fwd(q[r:r + 1, :, qs:qe], _take_heads(kr, keys), _take_heads(vr, keys), 0.0, False,
                        attn_mask=mask, scale=scale)
            out[r, qs:qe] = o[0].transpose(0, 1)
            lse[r, :, qs:qe] = lb[0]
    return out, lse


def _grad_buffers(q: torch.Tensor, k: torch.Tensor, acc: torch.dtype):
    """``(dq, dk, dv)`` of the backward: ``dq`` ``(rows, Hq, T, D)`` in ``q``'s dtype (every entry
    written once), ``dk`` / ``dv`` ``(rows, Hkv, T, D)`` zeros in ``acc`` (summed over query blocks)."""
    rows, hq, t, d = q.shape
    hkv = k.shape[1]
    dq = torch.empty(rows, hq, t, d, dtype=q.dtype, device=q.device)
    dk = torch.zeros(rows, hkv, t, d, dtype=acc, device=q.device)
    dv = torch.zeros(rows, hkv, t, d, dtype=acc, device=q.device)
    return dq, dk, dv


def _flash_backward(dout, q, k, v, out, lse, layout: BlockLayout, scale: float, window):
    _, bwd = _flash_ops()
    rows, hq, t, d = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    acc = lse.dtype
    dq, dk, dv = _grad_buffers(q, k, acc)
    for r in range(rows):
        kr, vr = k[r:r + 1].repeat_interleave(rep, 1), v[r:r + 1].repeat_interleave(rep, 1)
        for qs, qe, keys in layout.blocks[r]:
            mask = _block_mask(layout, r, qs, qe, keys, window, q.dtype)
            gq, gk, gv = bwd(dout[r:r + 1, qs:qe].transpose(1, 2), q[r:r + 1, :, qs:qe], _take_heads(kr, keys),
                             _take_heads(vr, keys), out[r:r + 1, qs:qe].transpose(1, 2),
                             lse[r:r + 1, :, qs:qe].contiguous(), 0.0, False, attn_mask=mask, scale=scale)
            dq[r, :, qs:qe] = gq[0]
            w = gk.shape[2]
            gk = gk[0].view(hkv, rep, w, d).sum(1, dtype=acc)
            gv = gv[0].view(hkv, rep, w, d).sum(1, dtype=acc)
            if isinstance(keys, slice):
                dk[r, :, keys] += gk
                dv[r, :, keys] += gv
            else:
                dk[r].index_add_(1, keys, gk)
                dv[r].index_add_(1, keys, gv)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: BlockLayout, scale: float, window: Optional[int]):
        ctx.layout, ctx.scale, ctx.window = layout, scale, window
        layout.calls += 1
        # under CPU autocast the projections can hand over mixed dtypes: compute in q's dtype
        k, v = k.to(q.dtype), v.to(q.dtype)
        if layout.flash:
            with torch.autocast(q.device.type, enabled=False):
                out, lse = _flash_forward(q, k, v, layout, scale, window)
            ctx.save_for_backward(q, k, v, out, lse)
            return out
        rows, hq, t, d = q.shape
        hkv = k.shape[1]
        rep = hq // hkv
        acc = torch.promote_types(q.dtype, torch.float32)
        out = q.new_empty(rows, t, hq, d)
        lse = torch.empty(rows, hq, t, dtype=acc, device=q.device)
        with torch.autocast(q.device.type, enabled=False):
            for r in range(rows):
                qr = q[r].view(hkv, rep, t, d)
                for qs, qe, keys in layout.blocks[r]:
                    n = qe - qs
                    qb = qr[:, :, qs:qe].reshape(hkv, rep * n, d)
                    kb, vb = _take(k[r], keys), _take(v[r], keys)
                    s = _scores(qb, kb, acc, scale).view(hkv, rep, n, -1)
                    s.masked_fill_(~_allowed(layout, r, qs, qe, keys, window), -math.inf)
                    m = s.amax(-1, keepdim=True)
                    p = s.sub_(m).exp_()
                    denom = p.sum(-1, keepdim=True)
                    p.div_(denom)
                    o = torch.matmul(p.view(hkv, rep * n, -1).to(v.dtype), vb)
                    out[r, qs:qe] = o.view(hkv, rep, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)
                    lse[r, :, qs:qe] = (m + denom.log()).view(hq, n)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale, window = ctx.layout, ctx.scale, ctx.window
        # under autocast the incoming gradient can be float32 while q/k/v are bfloat16
        dout = dout.to(q.dtype)
        if layout.flash:
            with torch.autocast(q.device.type, enabled=False):
                dq, dk, dv = _flash_backward(dout, q, k, v, out, lse, layout, scale, window)
            return dq, dk, dv, None, None, None
        rows, hq, t, d = q.shape
        hkv = k.shape[1]
        rep = hq // hkv
        acc = lse.dtype
        dq, dk, dv = _grad_buffers(q, k, acc)
        with torch.autocast(q.device.type, enabled=False):
            # rowsum(dO ⊙ O): (rows, hq, t)
            delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)
            for r in range(rows):
                qr = q[r].view(hkv, rep, t, d)
                dor = dout[r].permute(1, 0, 2).reshape(hkv, rep, t, d)
                for qs, qe, keys in layout.blocks[r]:
                    n = qe - qs
                    qb = qr[:, :, qs:qe].reshape(hkv, rep * n, d)
                    dob = dor[:, :, qs:qe].reshape(hkv, rep * n, d)
                    kb, vb = _take(k[r], keys), _take(v[r], keys)
                    s = _scores(qb, kb, acc, scale).view(hkv, rep, n, -1)
                    s.masked_fill_(~_allowed(layout, r, qs, qe, keys, window), -math.inf)
                    p = s.sub_(lse[r, :, qs:qe].reshape(hkv, rep, n, 1)).exp_().view(hkv, rep * n, -1)
                    dvb = torch.matmul(p.transpose(1, 2).to(dob.dtype), dob)
                    dp = torch.matmul(dob.to(acc), vb.to(acc).transpose(1, 2))
                    ds = p.mul_(dp.sub_(delta[r, :, qs:qe].reshape(hkv, rep * n, 1))).mul_(scale)
                    dsc = ds.to(q.dtype)
                    dq[r, :, qs:qe] = torch.matmul(dsc, kb).view(hkv, rep, n, d).reshape(hq, n, d)
                    dkb = torch.matmul(dsc.transpose(1, 2), qb)
                    if isinstance(keys, slice):
                        dk[r, :, keys] += dkb
                        dv[r, :, keys] += dvb
                    else:
                        dk[r].index_add_(1, keys, dkb.to(acc))
                        dv[r].index_add_(1, keys, dvb.to(acc))
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                    scale: Optional[float] = None, window: Optional[int] = None) -> torch.Tensor:
    """Attention of a laid-out batch under its mask rule, blockwise.

    Args:
        q: ``(rows, Hq, T, D)``; k, v: ``(rows, Hkv, T, D)`` with ``Hq`` a multiple of ``Hkv``
            (grouped-query attention: query head ``h`` uses key head ``h // (Hq/Hkv)``).
        layout: :func:`build_block_layout` of the batch.
        scale: score scale (default ``D ** -0.5``); window: sliding window in positions (a key is
            seen when ``pos_q - pos_k < window``), None for none.

    Returns:
        ``(rows, T, Hq, D)``: the layout transformers' attention functions return.
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"block_attention: {q.shape[1]} query heads not a multiple of {k.shape[1]} key heads")
    return _BlockAttention.apply(q, k, v, layout, d_scale(q) if scale is None else scale, window)


def d_scale(q: torch.Tensor) -> float:
    """The default score scale ``D ** -0.5`` of queries ``(..., D)`` (Vaswani et al. 2017, eq. 1)."""
    return q.shape[-1] ** -0.5
