"""Batch layouts of the log-probability engine: padded, shared-prompt and padding-free.

A batch of B preference pairs becomes rows of tokens plus an index of *targets*: every
completion token the model is scored on, the flat position of the hidden state that predicts
it, and the sequence it belongs to (``0..B-1`` chosen, ``B..2B-1`` rejected). Whatever the
layout, the engine gathers only those hidden states, so the per-sequence log-probs are the same
numbers and the losses never see the layout.

Layouts (``share_prompt`` × ``padding_free``):

* plain (False, False): rows ``[P C]`` for every pair, then ``[P R]``; right padding; a plain
  causal 2-D mask — what TRL does.
* shared prompt (True, ·): one unit ``[P C R]`` per pair. Under the unit's mask the rejected
  tokens see the prompt and themselves but not the chosen tokens, and their position ids restart
  right after the prompt, so each rejected token computes exactly what it would in ``[P R]``.
  The prompt runs once per pair. ``R[0]`` is predicted by the last prompt token, like ``C[0]``.
* padding-free (·, True): units are packed first-fit-decreasing into rows of at most
  ``max_tokens_per_batch`` tokens (default: the longest unit of the batch) with block-diagonal
  masks and restarted position ids, so almost no compute goes to padding.

The compact per-token description (``segment_ids``, ``branch_ids``) is turned into a 4-D mask
by :func:`build_attention_mask` on the device, right before the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.types import TokenizedPair

SHARED, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class _Unit:
    tokens: list[int]
    positions: list[int]
    branches: list[int]
    # (offset of predicting position inside the unit, token id, sequence index)
    targets: list[tuple[int, int, int]]
    pair: int = -1  # the pair the unit belongs to
    rejected_prompt: bool = False  # the unit's prompt is the pair's rejected-side prompt (other images)
    prompt_len: int = 0


def _units_for_pair(b: int, num_pairs: int, pair: TokenizedPair, share_prompt: bool) -> list[_Unit]:
    p, c, r = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
    own_rejected = pair.images is not None and pair.images.rejected_paths is not None
    if own_rejected:  # other images on the rejected side: its prompt is another sequence, never shared
        share_prompt = False
    rejected_p = (pair.images.rejected_prompt_ids or p) if own_rejected else p
    if not p:
        raise ValueError(f"pair {b}: empty prompt; the first completion token would have no predicting position")
    if not c or not r:
        raise ValueError(f"pair {b}: empty chosen or rejected completion (the data pipeline should have dropped it)")
    lp, lc, lr = len(p), len(c), len(r)
    if share_prompt:
        tokens = p + c + r
        positions = list(range(lp + lc)) + list(range(lp, lp + lr))
        branches = [SHARED] * lp + [CHOSEN] * lc + [REJECTED] * lr
        targets = [(lp - 1 + i, tok, b) for i, tok in enumerate(c)]
        targets += [((lp - 1) if j == 0 else (lp + lc + j - 1), tok, num_pairs + b) for j, tok in enumerate(r)]
        return [_Unit(tokens, positions, branches, targets, b, False, lp)]
    units = []
    for seq, prompt, comp in ((b, p, c), (num_pairs + b, rejected_p, r)):
        lp = len(prompt)
        n = lp + len(comp)
        units.append(_Unit(prompt + comp, list(range(n)), [SHARED] * n,
                           [(lp - 1 + i, tok, seq) for i, tok in enumerate(comp)], b,
                           own_rejected and seq >= num_pairs, lp))
    return units


def _last_tokens(u: _Unit, num_pairs: int, pad_token_id: int) -> list[tuple[int, int]]:
    """``(offset inside the unit, sequence)`` of the last token of each sequence the unit holds.

    "Last" is the rule of ``AutoModelForSequenceClassification``: the rightmost token whose id is not
    ``pad_token_id`` (when the pad token is the EOS, as for SmolLM2, that is the token before the
    final EOS); a sequence of pad tokens only gives its first token. A shared-prompt unit holds two
    sequences: prompt + chosen (prompt and chosen branch) and prompt + rejected (prompt and
    rejected branch); any other unit one.
    """
    seqs = sorted({seq for _, _, seq in u.targets})
    out = []
    for seq in seqs:
        if len(seqs) == 1:
            offsets = range(len(u.tokens))
        else:
            own = CHOSEN if seq < num_pairs else REJECTED
            offsets = [o for o, br in enumerate(u.branches) if br in (SHARED, own)]
        real = [o for o in offsets if u.tokens[o] != pad_token_id]
        out.append(((real or list(offsets))[-1 if real else 0], seq))
    return out


def pack_first_fit(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: the indices of ``lengths`` grouped into rows of at most
    ``budget`` tokens (a unit longer than the budget gets a row of its own), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for k, free in enumerate(room):
            if n <= free:
                rows[k].append(i)
                room[k] -= n
                break
        else:
            rows.append([i])
            room.append(max(budget, n) - n)
    return rows


def batch_tail(pairs: list[TokenizedPair], targets: tuple[list[int], list[int], list[int]],
               packed: bool) -> dict[str, torch.Tensor]:
    """What every layout's batch carries besides its rows: ``target_index`` / ``target_ids`` /
    ``target_seq`` ``(M,)`` int64 from ``targets`` (flat index of each predicting position, the
    token, the sequence), ``num_pairs`` ``()``, ``num_logical_tokens`` ``()`` (tokens of
    ``[P C]`` + ``[P R]``), ``packed`` ``()`` (1: 4-D masks needed); ``ref_chosen_logps`` /
    ``ref_rejected_logps`` ``(B,)`` float64 when every pair has them, ``record_index`` ``(B,)`` int64
    when every pair has one, ``margin`` ``(B,)`` float32 when some pair has one (0 for the others)."""
    t_index, t_ids, t_seq = targets
    extras: dict[str, torch.Tensor] = {
        "target_index": torch.tensor(t_index, dtype=torch.long),
        "target_ids": torch.tensor(t_ids, dtype=torch.long),
        "target_seq": torch.tensor(t_seq, dtype=torch.long),
        "num_pairs": torch.tensor(len(pairs)),
        "num_logical_tokens": torch.tensor(sum(p.num_tokens_logical for p in pairs)),
        "packed": torch.tensor(int(packed)),
    }
    if all(p.ref_chosen_logps is not None and p.ref_rejected_logps is not None for p in pairs):
        extras["ref_chosen_logps"] = torch.tensor([p.ref_chosen_logps for p in pairs], dtype=torch.float64)
        extras["ref_rejected_logps"] = torch.tensor([p.ref_rejected_logps for p in pairs], dtype=torch.float64)
    if all(p.record_index is not None for p in pairs):  # which records the batch holds (guard messages)
        extras["record_index"] = torch.tensor([p.record_index for p in pairs], dtype=torch.long)
    if any(p.margin is not None for p in pairs):  # reward-model margins; a pair without one has margin 0
        extras["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
    return extras


def attend(q, k, seg_q, seg_k, br_q=None, br_k=None, *, causal: bool = True):
    """The mask rule of every layout, elementwise over broadcastable tensors: query position ``q``
    (segment ``seg_q``, branch ``br_q``) sees key position ``k`` iff ``k <= q`` (when ``causal``),
    both lie in the same unit (segment, ``>= 0``: not padding) and, when branches are given, the key
    is a prompt token (``SHARED``) or on the query's own branch (chosen never sees rejected and vice
    versa). A padding query (``seg_q < 0``) sees only itself, so no softmax row is empty.

    Used for the 4-D masks (:func:`build_attention_mask`, encoder–decoder masks), FlexAttention's
    ``mask_mod`` and the blocks of :mod:`preftune.engine.block_attention`.
    """
    ok = (seg_q == seg_k) & (seg_k >= 0)
    if causal:
        ok = (k <= q) & ok
    if br_q is not None:
        ok = ok & ((br_k == SHARED) | (br_k == br_q))
    return ok | ((q == k) & (seg_q < 0))


def collate_pairs(
    pairs: list[TokenizedPair],
    *,
    share_prompt: bool = True,
    padding_free: bool = True,
    max_tokens_per_batch: int | None = None,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Lay out a batch of B pairs as rows and a target index.

    Returns a dict of tensors (CPU):

    * ``input_ids``, ``position_ids``, ``segment_ids``, ``branch_ids``: ``(rows, T)`` int64;
      ``segment_ids`` is the unit number inside its row, ``-1`` on padding; ``branch_ids`` is
      0 (prompt / whole sequence), 1 (chosen) or 2 (rejected) in a shared-prompt unit.
    * ``target_index``: ``(M,)`` flat index into ``rows*T`` of the hidden state that predicts
      each scored token; ``target_ids``: ``(M,)`` the token; ``target_seq``: ``(M,)`` the
      sequence (chosen ``b`` → ``b``, rejected ``b`` → ``B+b``).
    * ``last_index``: ``(2B,)`` flat index of the last token of each sequence (same order), where
      a reward model reads its value (see :func:`_last_tokens`); ``pad_token_id``: ``()`` the pad
      id that rule used.
    * ``margin``: ``(B,)`` float32, when some pair carries a reward margin (0 for the others).
    * ``record_index``: ``(B,)`` int64, each pair's ``record_index`` (its position in the trainer's
      dataset), when every pair has one.
    * ``num_pairs``: ``()``; ``num_logical_tokens``: ``()`` tokens of ``[P C]`` + ``[P R]``.
    * ``ref_chosen_logps`` / ``ref_rejected_logps``: ``(B,)`` float64, when every pair carries
      precomputed reference log-probs.
    * ``packed``: ``()`` 1 when a 4-D mask is needed (shared prompt or several units per row).

    Pairs with images (:class:`preftune.types.PairImages`) need the vision kind's ``collate``, which
    adds the image tensors to these rows (:func:`preftune.engine.layout_vision.image_batch_inputs`).

    Raises ``ValueError`` for an empty batch, prompt or completion, or a pair with images.
    """
    if any(p.images is not None for p in pairs):
        raise ValueError("collate_pairs: pairs with images need the vision kind's layout "
                         "(preftune.engine.kinds.kind_for(model).collate)")
    return layout_rows(pairs, share_prompt=share_prompt, padding_free=padding_free,
                       max_tokens_per_batch=max_tokens_per_batch, pad_token_id=pad_token_id)[0]


def layout_rows(pairs: list[TokenizedPair], *, share_prompt: bool = True, padding_free: bool = True,
                max_tokens_per_batch: int | None = None, pad_token_id: int = 0
                ) -> tuple[dict[str, torch.Tensor], list[tuple[_Unit, int, int]], int]:
    """:func:`collate_pairs`' rows for any pairs (images' tokens laid out as text), with where every
    unit went: ``(batch, placed, width)``; ``placed``: ``(unit, row, offset)`` of every unit,
    ``width``: the row length ``T``. Raises ``ValueError`` as :func:`collate_pairs`."""
    if not pairs:
        raise ValueError("collate_pairs: empty batch")
    num_pairs = len(pairs)
    units: list[_Unit] = []
    for b, pair in enumerate(pairs):
        units.extend(_units_for_pair(b, num_pairs, pair, share_prompt))
    if not share_prompt and not padding_free:
        # keep TRL's order: all chosen rows first, then all rejected rows
        units = units[0::2] + units[1::2]
    if padding_free:
        budget = max_tokens_per_batch or max(len(u.tokens) for u in units)
        rows = pack_first_fit([len(u.tokens) for u in units], budget)
    else:
        rows = [[i] for i in range(len(units))]
    width = max(sum(len(units[i].tokens) for i in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segment_ids = torch.full((n_rows, width), -1, dtype=torch.long)
    branch_ids = torch.zeros((n_rows, width), dtype=torch.long)
    t_index, t_ids, t_seq = [], [], []
    last = [0] * (2 * num_pairs)
    placed: list[tuple[_Unit, int, int]] = []  # (unit, row, offset)
    for r, row in enumerate(rows):
        offset = 0
        for s, i in enumerate(row):
            u = units[i]
            n = len(u.tokens)
            placed.append((u, r, offset))
            input_ids[r, offset:offset + n] = torch.tensor(u.tokens)
            position_ids[r, offset:offset + n] = torch.tensor(u.positions)
            segment_ids[r, offset:offset + n] = s
            branch_ids[r, offset:offset + n] = torch.tensor(u.branches)
            for pos, tok, seq in u.targets:
                t_index.append(r * width + offset + pos)
                t_ids.append(tok)
                t_seq.append(seq)
            for pos, seq in _last_tokens(u, num_pairs, pad_token_id):
                last[seq] = r * width + offset + pos
            offset += n
    batch = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "branch_ids": branch_ids,
        "last_index": torch.tensor(last, dtype=torch.long),
        "pad_token_id": torch.tensor(pad_token_id),
    }
    batch.update(batch_tail(pairs, (t_index, t_ids, t_seq), share_prompt or any(len(row) > 1 for row in rows)))
    return batch, placed, width


def build_attention_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor, *, packed: bool,
                         additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention mask for a laid-out batch.

    Unpacked (one plain sequence per row): the 2-D padding mask ``(rows, T)`` int64, so the model
    keeps its fast causal kernels. Packed: a 4-D mask ``(rows, 1, T, T)`` where query ``i`` sees
    key ``j`` under :func:`attend` (causal, same unit, prompt or own branch; padding queries see only
    themselves: a fully masked row would give NaN in SDPA). Boolean (True = attend) unless
    ``additive_dtype`` is given (eager attention): then 0 / dtype-min floats.
    """
    if not packed:
        return (segment_ids >= 0).long()
    t = segment_ids.shape[1]
    pos = torch.arange(t, device=segment_ids.device)
    mask = attend(pos[:, None], pos[None, :], segment_ids[:, :, None], segment_ids[:, None, :],
                  branch_ids[:, :, None], branch_ids[:, None, :])[:, None]
    if additive_dtype is not None:
        zero = torch.zeros((), dtype=additive_dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(additive_dtype).min)
    return mask


def build_block_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor):
    """The packed mask of :func:`build_attention_mask` as a FlexAttention ``BlockMask``.

    Same rule (causal, same unit, prompt or own branch; padding sees itself), evaluated blockwise
    by ``torch.nn.attention.flex_attention.create_block_mask``, so fully masked blocks (other
    units of a packed row, chosen↔rejected) are skipped instead of computed and discarded.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    rows, t = segment_ids.shape
    return create_block_mask(make_mask_mod(segment_ids, branch_ids), rows, None, t, t, device=segment_ids.device)


def make_mask_mod(segment_ids: torch.Tensor, branch_ids: torch.Tensor):
    """FlexAttention ``mask_mod(b, h, q, k) -> bool`` of the packed rule (see :func:`build_attention_mask`)."""
    seg, br = segment_ids, branch_ids

    def mask_mod(b, h, q, k):
        return attend(q, k, seg[b, q], seg[b, k], br[b, q], br[b, k])

    return mask_mod


def varlen_boundaries(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The packed rows as independent causal sequences, in the form of flash-attn's varlen kernels.

    ``segment_ids`` ``(rows, T)`` (:func:`collate_pairs`; a layout *without* a shared prompt, where
    every unit is one causal sequence) is read flat, row after row, as ``rows*T`` tokens: a sequence
    starts at every row start and wherever the segment id changes, so each unit is one sequence and
    each row's padding run one more (its outputs are never read). Returns ``(cu_seqlens, max_len)``:
    ``cu_seqlens`` ``(n+1,)`` int32 on ``segment_ids``' device, the flat start of every sequence and
    ``rows*T`` last (``cu_seqlens_q/k`` of ``flash_attn_varlen_func``, Dao 2023, "FlashAttention-2");
    ``max_len``: the longest sequence, tokens (a Python int: one host sync).
    """
    rows, t = segment_ids.shape
    flat = segment_ids.reshape(-1)
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1]
    start[::t] = True  # a row never continues the previous one
    starts = torch.nonzero(start).squeeze(1)
    end = torch.tensor([rows * t], device=flat.device, dtype=starts.dtype)
    cu_seqlens = torch.cat([starts, end]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())
