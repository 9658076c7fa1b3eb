"""Batch layouts for encoder–decoder models (T5, mT5, BART ...): encoder rows of prompts, decoder
rows of completions.

An encoder–decoder model reads the prompt with its encoder and scores a completion ``y`` with its
decoder, fed ``[start] + y[:-1]`` (the labels shifted right, ``decoder_start_token_id`` first, as
the model's own ``_shift_right`` does); decoder position ``i`` predicts ``y[i]``. The shared-prompt
idea is free here: **the encoder runs once per pair** in every layout and both completions
cross-attend to the same encoder states (TRL repeats the prompt for the rejected rows and encodes
it twice).

Decoder layouts (``share_prompt`` × ``padding_free``):

* rows of one sequence (False, False): ``B`` chosen rows, then ``B`` rejected rows, right-padded
  (TRL's order); each row cross-attends to its pair's encoder row (encoder states gathered).
* chosen + rejected in one row (True, False): ``[C R]`` per pair; ``R`` does not see ``C``.
* packed (·, True): decoder units (a pair's ``[C R]``, or ``C`` and ``R`` alone without
  ``share_prompt``) packed first-fit-decreasing into rows of at most ``max_tokens_per_batch``
  *decoder* tokens (default: the longest unit); the encoder row beside each decoder row holds the
  prompts of the pairs in it (block-diagonal encoder attention, each completion cross-attends to its
  own prompt's segment only).

Several sequences in one row need position information that depends on relative offsets only:
T5 / mT5 (relative attention bias) have it, so they get every layout (``packable``). Models with
absolute decoder positions computed from the row (BART, Marian, ...: no ``position_ids`` argument)
do not: for them every layout falls back to **padded rows of one sequence** (the first layout; the
encoder still runs once per pair), which :func:`collate_seq2seq` logs once.

The per-token description (``*_segment_ids``, ``decoder_cross_segment``) is turned into masks on
the device by :func:`seq2seq_masks`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from preftune.engine.layout import attend, batch_tail, pack_first_fit
from preftune.types import TokenizedPair

logger = logging.getLogger("preftune.engine")

_FALLBACK_LOGGED: set[str] = set()


@dataclass
class _DecUnit:
    pair: int
    segments: list[tuple[list[int], int]]  # (labels, sequence index) of each decoder segment

    @property
    def length(self) -> int:
        return sum(len(labels) for labels, _ in self.segments)


def _decoder_units(pairs: list[TokenizedPair], joined: bool) -> list[_DecUnit]:
    b_total = len(pairs)
    units = []
    for b, pair in enumerate(pairs):
        if not pair.prompt_ids:
            raise ValueError(f"pair {b}: empty prompt (an encoder–decoder model needs an encoder input)")
        if not pair.chosen_ids or not pair.rejected_ids:
            raise ValueError(f"pair {b}: empty chosen or rejected completion (the data pipeline should have dropped it)")
        if pair.images is not None:
            raise ValueError(f"pair {b}: images are not supported with encoder–decoder models")
        chosen, rejected = (pair.chosen_ids, b), (pair.rejected_ids, b_total + b)
        if joined:
            units.append(_DecUnit(b, [chosen, rejected]))
        else:
            units.append(_DecUnit(b, [chosen]))
            units.append(_DecUnit(b, [rejected]))
    return units


def collate_seq2seq(
    pairs: list[TokenizedPair],
    *,
    share_prompt: bool = True,
    padding_free: bool = True,
    max_tokens_per_batch: int | None = None,
    pad_token_id: int = 0,
    decoder_start_token_id: int = 0,
    packable: bool = True,
    model_type: str = "",
) -> dict[str, torch.Tensor]:
    """Lay out a batch of B pairs for an encoder–decoder model (see the module docstring).

    Returns a dict of CPU tensors:

    * ``input_ids``, ``encoder_segment_ids``: ``(E, Te)`` int64, the encoder rows (prompts) and the
      segment of each token in its row (``-1`` on padding);
    * ``decoder_input_ids``, ``decoder_segment_ids``, ``decoder_cross_segment``: ``(D, Td)``; the
      decoder inputs (shifted labels), the segment of each token (``-1`` on padding) and the encoder
      segment (of the row's encoder row) it cross-attends to;
    * ``decoder_encoder_row``: ``(D,)`` the encoder row of each decoder row;
    * ``target_index`` ``(M,)`` (flat into ``D*Td``), ``target_ids``, ``target_seq`` (``0..B-1``
      chosen, ``B..2B-1`` rejected), as in :func:`preftune.engine.layout.collate_pairs`;
    * ``num_pairs``, ``num_logical_tokens`` (tokens of ``[P C]`` + ``[P R]``), ``packed`` (1 when a
      row holds several segments: 4-D masks), ``seq2seq`` (1), and ``ref_*`` / ``record_index`` /
      ``margin`` when the pairs carry them (as ``collate_pairs``).

    ``packable`` False (absolute decoder positions, e.g. BART): padded rows of one sequence whatever
    ``share_prompt`` / ``padding_free`` say (logged once per ``model_type``).

    Raises ``ValueError`` for an empty batch, prompt or completion, or a pair with images.
    """
    if not pairs:
        raise ValueError("collate_seq2seq: empty batch")
    if not packable and (share_prompt or padding_free) and model_type not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add(model_type)
        logger.info("%s: decoder positions are absolute, so chosen and rejected cannot share a decoder row; "
                    "padded decoder rows of one sequence are used (the encoder still runs once per pair)",
                    model_type or "this model")
    joined = share_prompt and packable
    units = _decoder_units(pairs, joined)
    pack = padding_free and packable
    if pack:
        budget = max_tokens_per_batch or max(u.length for u in units)
        rows = pack_first_fit([u.length for u in units], budget)
    elif joined:
        rows = [[i] for i in range(len(units))]
    else:  # TRL's order: all chosen rows, then all rejected rows
        rows = [[i] for i in range(0, len(units), 2)] + [[i] for i in range(1, len(units), 2)]
    num_pairs = len(pairs)

    # encoder rows: one per pair, unless decoder rows mix pairs (packed): then one per decoder row
    if pack:
        enc_rows = []
        for row in rows:
            enc_rows.append(list(dict.fromkeys(units[i].pair for i in row)))
        dec_enc_row = list(range(len(rows)))
    else:
        enc_rows = [[b] for b in range(num_pairs)]
        dec_enc_row = [units[row[0]].pair for row in rows]
    te = max(sum(len(pairs[b].prompt_ids) for b in row) for row in enc_rows)
    input_ids = torch.full((len(enc_rows), te), pad_token_id, dtype=torch.long)
    enc_seg = torch.full((len(enc_rows), te), -1, dtype=torch.long)
    seg_of_pair: list[dict[int, int]] = []
    for r, row in enumerate(enc_rows):
        offset, where = 0, {}
        for s, b in enumerate(row):
            ids = pairs[b].prompt_ids
            input_ids[r, offset:offset + len(ids)] = torch.tensor(ids)
            enc_seg[r, offset:offset + len(ids)] = s
            where[b] = s
            offset += len(ids)
        seg_of_pair.append(where)

    td = max(sum(units[i].length for i in row) for row in rows)
    dec_ids = torch.full((len(rows), td), pad_token_id, dtype=torch.long)
    dec_seg = torch.full((len(rows), td), -1, dtype=torch.long)
    cross = torch.full((len(rows), td), -1, dtype=torch.long)
    t_index, t_ids, t_seq = [], [], []
    multi = False
    for r, row in enumerate(rows):
        offset, s = 0, 0
        for i in row:
            unit = units[i]
            enc_segment = seg_of_pair[dec_enc_row[r]][unit.pair]
            for labels, seq in unit.segments:
                n = len(labels)
                dec_ids[r, offset:offset + n] = torch.tensor([decoder_start_token_id] + labels[:-1])
                dec_seg[r, offset:offset + n] = s
                cross[r, offset:offset + n] = enc_segment
                t_index.extend(r * td + offset + k for k in range(n))
                t_ids.extend(labels)
                t_seq.extend([seq] * n)
                offset += n
                s += 1
        multi |= s > 1
    multi |= any(len(row) > 1 for row in enc_rows)
    batch = {
        "input_ids": input_ids,
        "encoder_segment_ids": enc_seg,
        "decoder_input_ids": dec_ids,
        "decoder_segment_ids": dec_seg,
        "decoder_cross_segment": cross,
        "decoder_encoder_row": torch.tensor(dec_enc_row, dtype=torch.long),
        "seq2seq": torch.tensor(1),
    }
    batch.update(batch_tail(pairs, (t_index, t_ids, t_seq), multi))
    return batch


def seq2seq_masks(batch: dict[str, torch.Tensor], *, additive_dtype: torch.dtype | None = None
                  ) -> dict[str, torch.Tensor]:
    """Encoder, decoder and cross-attention masks of a :func:`collate_seq2seq` batch (on its device).

    Unpacked batches get 2-D padding masks (the model's own causal / bidirectional handling):
    ``encoder`` ``(E, Te)``, ``decoder`` ``(D, Td)``, ``cross`` ``(D, Te)`` (the encoder mask of each
    decoder row's encoder row). Packed batches get 4-D masks: ``encoder`` ``(E, 1, Te, Te)`` (same
    segment), ``decoder`` ``(D, 1, Td, Td)`` (causal, same segment), ``cross`` ``(D, 1, Td, Te)``
    (the decoder token's prompt segment); a padding query sees one key (itself, or encoder position
    0), so no softmax row is empty. Boolean (True = attend) unless ``additive_dtype`` (eager
    attention): 0 / dtype-min floats.
    """
    enc_seg, dec_seg = batch["encoder_segment_ids"], batch["decoder_segment_ids"]
    cross_seg, enc_row = batch["decoder_cross_segment"], batch["decoder_encoder_row"]
    if not bool(batch["packed"]):
        enc = (enc_seg >= 0).long()
        return {"encoder": enc, "decoder": (dec_seg >= 0).long(), "cross": enc.index_select(0, enc_row)}
    te, td = enc_seg.shape[1], dec_seg.shape[1]
    dev = enc_seg.device
    pe, pd = torch.arange(te, device=dev), torch.arange(td, device=dev)
    enc = attend(pe[:, None], pe[None, :], enc_seg[:, :, None], enc_seg[:, None, :], causal=False)
    dec = attend(pd[:, None], pd[None, :], dec_seg[:, :, None], dec_seg[:, None, :])
    keys = enc_seg.index_select(0, enc_row)  # (D, Te): the segments of each decoder row's encoder row
    cross = (cross_seg[:, :, None] == keys[:, None, :]) & (keys[:, None, :] >= 0)
    first = torch.zeros(te, dtype=torch.bool, device=dev)
    first[0] = True
    cross |= first[None, None, :] & (cross_seg[:, :, None] < 0)
    masks = {"encoder": enc[:, None], "decoder": dec[:, None], "cross": cross[:, None]}
    if additive_dtype is not None:
        zero = torch.zeros((), dtype=additive_dtype, device=dev)
        masks = {k: torch.where(v, zero, torch.finfo(additive_dtype).min) for k, v in masks.items()}
    return masks


def is_seq2seq_batch(batch: dict[str, torch.Tensor]) -> bool:
    """True for a batch laid out by :func:`collate_seq2seq`."""
    return "decoder_input_ids" in batch
