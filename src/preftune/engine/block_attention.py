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

from preftune.engine.layout import SHARED

#: scores per block (heads × block_q × keys) before the block is split further: 2^23 floats
BLOCK_ELEMENTS = 2 ** 23


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
    blocks: list[list[tuple[int, int, Union[slice, torch.Tensor]]]] = field(default_factory=list)
    calls: int = 0  # attention calls served (a check that the model passed the layout through)


def _allowed(layout: BlockLayout, r: int, qs: int, qe: int, keys, window: Optional[int]) -> torch.Tensor:
    """``(qe-qs, W)`` bool: query ``i`` sees key ``j`` (the rule of ``layout.build_attention_mask``)."""
    seg, br, pos = layout.segment_ids[r], layout.branch_ids[r], layout.position_ids[r]
    dev = seg.device
    q_idx = torch.arange(qs, qe, device=dev)[:, None]
    k_idx = (torch.arange(keys.start, keys.stop, device=dev) if isinstance(keys, slice) else keys)[None, :]
    sq, sk = seg[qs:qe, None], seg[k_idx]
    bq, bk = br[qs:qe, None], br[k_idx]
    ok = (k_idx <= q_idx) & (sq == sk) & (sk >= 0) & ((bk == SHARED) | (bk == bq))
    if window is not None:
        ok &= (pos[qs:qe, None] - pos[k_idx]) < window
    return ok | ((k_idx == q_idx) & (sq < 0))


def build_block_layout(segment_ids: torch.Tensor, branch_ids: torch.Tensor, position_ids: torch.Tensor,
                       num_heads: int, block_q: Optional[int] = None) -> BlockLayout:
    """Split every row into query blocks and find the keys each block sees.

    ``block_q`` (default: about :data:`BLOCK_ELEMENTS` scores per block for ``num_heads`` heads,
    between 64 and ``T`` queries). A block's keys run from the start of the unit of its first query
    to its last query; a run of keys no query of the block sees (the chosen branch, seen from a
    rejected block) is cut out when it is at least a quarter of that range.
    """
    rows, t = segment_ids.shape
    if block_q is None:
        block_q = max(64, min(t, BLOCK_ELEMENTS // max(1, num_heads * t)))
    layout = BlockLayout(segment_ids, branch_ids, position_ids, block_q)
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


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: BlockLayout, scale: float, window: Optional[int]):
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
                    s = torch.matmul(qb, kb.transpose(1, 2)).to(acc).mul_(scale).view(hkv, rep, n, -1)
                    s.masked_fill_(~_allowed(layout, r, qs, qe, keys, window), -math.inf)
                    m = s.amax(-1, keepdim=True)
                    p = s.sub_(m).exp_()
                    denom = p.sum(-1, keepdim=True)
                    p.div_(denom)
                    o = torch.matmul(p.view(hkv, rep * n, -1).to(v.dtype), vb)
                    out[r, qs:qe] = o.view(hkv, rep, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)
                    lse[r, :, qs:qe] = (m + denom.log()).view(hq, n)
        layout.calls += 1
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.window = layout, scale, window
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale, window = ctx.layout, ctx.scale, ctx.window
        rows, hq, t, d = q.shape
        hkv = k.shape[1]
        rep = hq // hkv
        acc = lse.dtype
        dq = torch.empty(rows, hq, t, d, dtype=q.dtype, device=q.device)
        dk = torch.zeros(rows, hkv, t, d, dtype=acc, device=q.device)
        dv = torch.zeros(rows, hkv, t, d, dtype=acc, device=q.device)
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
                    s = torch.matmul(qb, kb.transpose(1, 2)).to(acc).mul_(scale).view(hkv, rep, n, -1)
                    s.masked_fill_(~_allowed(layout, r, qs, qe, keys, window), -math.inf)
                    p = s.sub_(lse[r, :, qs:qe].reshape(hkv, rep, n, 1)).exp_().view(hkv, rep * n, -1)
                    dvb = torch.matmul(p.transpose(1, 2).to(dob.dtype), dob)
                    dp = torch.matmul(dob, vb.transpose(1, 2)).to(acc)
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
    return q.shape[-1] ** -0.5
