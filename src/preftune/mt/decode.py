"""Greedy decoding with continuous batching for ``preftune mt translate`` (decoder-only models).

:func:`greedy_continuous` keeps a key/value cache of up to ``batch_size`` rows; a row leaves as
soon as it stops (EOS, a newline after some text — ALMA keeps the first line —, or
``max_new_tokens``) and its slot is refilled with the next prompt, so a batch never waits for its
longest row. It reproduces ``model.generate``'s greedy tokens (each row's positions count its own
tokens; the argmax of the last position's float32 logits). :func:`greedy_loop_supported` says
for which models; :mod:`preftune.mt.translate` falls back to ``model.generate`` otherwise.
"""

from __future__ import annotations

import weakref

import torch

from preftune.engine.kinds import kind_for

_NEWLINE_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def newline_token_mask(tokenizer) -> torch.BoolTensor:
    """Which token ids can put a newline into a decoded continuation.

    Returns a bool tensor ``[len(tokenizer)]``, ``True`` where ``decode([id], skip_special_tokens=True)``
    contains a newline. A newline in the decoded text of a sequence comes from one of its tokens (a
    newline byte is never part of a multi-byte character), so a continuation without any of these
    ids cannot pass the stop-at-newline test. Computed once per tokenizer object.
    """
    mask = _NEWLINE_MASKS.get(tokenizer)
    if mask is None:
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        mask = torch.tensor(["\n" in p for p in pieces], dtype=torch.bool)
        _NEWLINE_MASKS[tokenizer] = mask
    return mask


def _has_newline_token(tokens: torch.LongTensor, mask: torch.BoolTensor) -> torch.BoolTensor:
    """``mask[tokens]`` (same shape as ``tokens``); ids beyond the tokenizer's range give ``False``."""
    mask = mask.to(tokens.device)
    return mask[tokens.clamp(min=0, max=mask.numel() - 1)] & (tokens < mask.numel()) & (tokens >= 0)


def _stops_at_newline(text: str) -> bool:
    """ALMA's stop test on a decoded continuation: a newline after some non-blank text."""
    return "\n" in text.lstrip()


#: generation-config fields that add a logits processor or change greedy search, with their neutral
#: values; :func:`greedy_loop_supported` is false when any is set otherwise.
_PROCESSOR_FIELDS: dict[str, tuple] = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
    "forced_decoder_ids": (None,), "guidance_scale": (None, 1.0), "watermarking_config": (None,),
    "penalty_alpha": (None,), "prompt_lookup_num_tokens": (None,), "token_healing": (None, False),
    "dola_layers": (None,), "stop_strings": (None,),
}


def greedy_loop_supported(model) -> bool:
    """Whether :func:`greedy_continuous` reproduces ``model.generate`` greedy for ``model``.

    True for a decoder-only model whose ``forward`` takes ``position_ids`` and ``logits_to_keep``,
    whose ``transformers.DynamicCache`` holds only plain ``DynamicLayer`` layers (no sliding
    window, no recurrent state) and whose generation config adds no logits processor (repetition
    penalty, suppressed tokens, ...).
    """
    import inspect

    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not kind_for(model).generates_after_prompt:  # an encoder–decoder model: model.generate
        return False
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params or "logits_to_keep" not in params:
        return False
    gc = model.generation_config
    for name, neutral in _PROCESSOR_FIELDS.items():
        value = getattr(gc, name, None)
        if isinstance(value, (list, tuple, dict)) and not value:
            continue
        if value not in neutral:
            return False
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - an unusual config: keep model.generate
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Left-padded ``(input_ids, attention_mask)``, both ``[len(seqs), longest]``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``n`` zeros in front of ``t`` along ``dim``."""
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _spare_layer_class():
    """A ``transformers.DynamicLayer`` that writes each step's key/value states into spare columns
    of a buffer (64 at a time) instead of concatenating the whole cache every step; ``keys`` /
    ``values`` are views of the filled part. When they are replaced from outside (rows dropped or
    joined), the next update copies them into a new buffer."""
    from transformers.cache_utils import DynamicLayer

    class SpareColumnsLayer(DynamicLayer):
        spare = 64

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            buf_k = getattr(self, "_buf_k", None)
            n = self.keys.shape[-2] if self.keys.numel() else 0
            need = n + key_states.shape[-2]
            own = (buf_k is not None and self.keys.data_ptr() == buf_k.data_ptr()
                   and self.keys.shape[:2] == buf_k.shape[:2] and self.keys.stride() == buf_k.stride())
            if not own or need > buf_k.shape[-2]:
                shape = (*key_states.shape[:2], need + self.spare, key_states.shape[-1])
                buf_k, buf_v = key_states.new_empty(shape), value_states.new_empty(shape)
                if n:
                    buf_k[:, :, :n] = self.keys
                    buf_v[:, :, :n] = self.values
                self._buf_k, self._buf_v = buf_k, buf_v
            self._buf_k[:, :, n:need] = key_states
            self._buf_v[:, :, n:need] = value_states
            self.keys, self.values = self._buf_k[:, :, :need], self._buf_v[:, :, :need]
            return self.keys, self.values

    return SpareColumnsLayer


def _new_cache(model, spare_columns: bool):
    """A ``DynamicCache`` for ``model``; with ``spare_columns`` its layers are :func:`_spare_layer_class`."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if spare_columns:
        cls = _spare_layer_class()
        cache.layers = [cls() for _ in cache.layers]
    return cache


class _RunningBatch:
    """The rows being decoded: their key/value cache, 2-D attention mask ``[rows, cache columns]``,
    the position of each row's pending (generated, not yet fed) token, the tokens so far, and
    which rows are still alive (finished rows stay, ignored, until the next :meth:`compact`)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.gen: list[list[int]] = []
        self.alive: list[bool] = []
        self.n_alive = 0
        self.cache = None
        self.mask: torch.LongTensor | None = None
        self.pos: torch.LongTensor | None = None
        self.pending: torch.LongTensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: list[int], cache, mask: torch.LongTensor, first: torch.LongTensor) -> None:
        """Add prefilled rows (``cache`` and ``mask`` over their prompts, ``first`` = their first tokens);
        the narrower side is left-padded with masked zero columns."""
        pos = mask.sum(dim=1)
        if not self.rows:
            self.cache, self.mask, self.pos, self.pending = cache, mask, pos, first
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            pad_old, pad_new = width - self.mask.shape[1], width - mask.shape[1]
            for old, new in zip(self.cache.layers, cache.layers):
                old.keys = torch.cat([_pad_left(old.keys, pad_old, 2), _pad_left(new.keys, pad_new, 2)])
                old.values = torch.cat([_pad_left(old.values, pad_old, 2), _pad_left(new.values, pad_new, 2)])
            self.mask = torch.cat([_pad_left(self.mask, pad_old, 1), _pad_left(mask, pad_new, 1)])
            self.pos = torch.cat([self.pos, pos])
            self.pending = torch.cat([self.pending, first])
        self.rows += rows
        self.gen += [[] for _ in rows]
        self.alive += [True] * len(rows)
        self.n_alive += len(rows)

    def compact(self) -> None:
        """Drop the finished rows; cut cache columns no remaining row attends to."""
        keep = [r for r, a in enumerate(self.alive) if a]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[r] for r in keep]
        self.gen = [self.gen[r] for r in keep]
        self.alive = [True] * len(keep)
        if not keep:
            self.cache = self.mask = self.pos = self.pending = None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.mask, self.pos, self.pending = self.mask[idx], self.pos[idx], self.pending[idx]
        first = int(self.mask.any(dim=0).long().argmax())
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, first:]
            layer.values = layer.values[idx, :, first:]


@torch.inference_mode()
def greedy_continuous(model, tokenizer, prompt_ids: list[list[int]], *, batch_size: int, max_new_tokens: int,
                      refill_at: int | None = None, compact_at: int | None = None, spare_columns: bool = True,
                      on_result=None) -> list[tuple[list[int], bool]]:
    """Greedy decoding of many prompts with a key/value cache, at most ``batch_size`` rows at a time.

    A row is done as soon as it stops (EOS; a newline after text, as :class:`_StopAtNewline`;
    ``max_new_tokens``). Once ``compact_at`` rows are done (default ``max(1, batch_size // 4)``)
    their cache rows are dropped; once ``refill_at`` slots are free (default the same;
    ``refill_at=batch_size`` decodes batch by batch) the next prompts are prefilled, left-padded
    among themselves, and join the running batch (the narrower cache is left-padded with masked
    zeros); cache columns no running row attends to are cut off. As in ``model.generate``:
    positions count each row's own tokens (padding never shifts them) and each step takes the
    argmax of the last position's logits in float32, so a row's tokens depend on the other rows
    only through the float rounding of batched kernels.

    Args:
        prompt_ids: token ids of each prompt (special tokens already added), in the order they
            enter the batch.
        spare_columns: cache layers that fill spare columns in place (:func:`_spare_layer_class`)
            rather than concatenating the whole cache every step (``False``: plain ``DynamicLayer``).
        on_result: called as ``on_result(i, tokens, truncated)`` as soon as prompt ``i`` finishes.

    Returns:
        ``[(tokens, truncated)]`` per prompt: the generated ids (the EOS included when hit) and
        whether the row reached ``max_new_tokens`` without EOS or newline.

    Raises:
        ValueError: ``batch_size`` or ``max_new_tokens`` below 1, or an empty prompt.
    """
    import inspect
    from collections import deque

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1 (got {batch_size}, {max_new_tokens})")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("an empty prompt cannot be decoded (no token to condition on)")
    quarter = max(1, batch_size // 4)
    refill_at = max(1, min(batch_size, quarter if refill_at is None else refill_at))
    compact_at = max(1, quarter if compact_at is None else compact_at)
    device = model.device
    # transformers 5.2x renamed the forward's cache argument (``past_key_values`` is deprecated there)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
    nl_mask = newline_token_mask(tokenizer).to(device)
    results: list[tuple[list[int], bool] | None] = [None] * len(prompt_ids)
    queue = deque(range(len(prompt_ids)))
    batch = _RunningBatch()

    while queue or batch.n_alive:
        free = batch_size - batch.n_alive
        refill = bool(queue) and (not batch.n_alive or free >= refill_at)
        dead = len(batch) - batch.n_alive
        if dead and (refill or dead >= compact_at or not batch.n_alive):
            batch.compact()
        if refill:
            take = [queue.popleft() for _ in range(min(free, len(queue)))]
            ids, am = _left_pad([prompt_ids[i] for i in take], pad_id, device)
            positions = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
            cache = _new_cache(model, spare_columns)
            out = model(input_ids=ids, attention_mask=am, position_ids=positions, **{cache_kw: cache},
                        use_cache=True, logits_to_keep=1)
            tokens = out.logits[:, -1].to(dtype=torch.float32).argmax(dim=-1)
            del out
            start = len(batch)
            batch.join(take, cache, am, tokens)
            targets = range(start, len(batch))
        else:
            am = torch.cat([batch.mask, batch.mask.new_ones(len(batch), 1)], dim=1)
            out = model(input_ids=batch.pending[:, None], attention_mask=am, position_ids=batch.pos[:, None],
                        **{cache_kw: batch.cache}, use_cache=True, logits_to_keep=1)
            tokens = out.logits[:, -1].to(dtype=torch.float32).argmax(dim=-1)
            del out
            # finished rows still in the batch keep their position (their tokens are ignored)
            alive = torch.tensor(batch.alive, dtype=torch.long, device=device)
            batch.mask, batch.pos, batch.pending = am, batch.pos + alive, tokens
            targets = range(len(batch))
        for r, t, nl in zip(targets, tokens.tolist(), _has_newline_token(tokens, nl_mask).tolist()):
            if not batch.alive[r]:
                continue
            seq = batch.gen[r]
            seq.append(t)
            stop = t in eos_ids or (nl and _stops_at_newline(tokenizer.decode(seq, skip_special_tokens=True)))
            if stop or len(seq) >= max_new_tokens:
                batch.alive[r] = False
                batch.n_alive -= 1
                results[batch.rows[r]] = (seq, not stop)
                if on_result is not None:
                    on_result(batch.rows[r], seq, not stop)
    return results
