"""Batched translation with a causal LM or an encoder–decoder LM (base model, or base + LoRA adapter).

Prompts are ALMA's (:mod:`preftune.mt.prompts`); for a causal LM inputs are left-padded so every
row's prompt ends at the same position and the continuation is what follows the prompt; for an
encoder–decoder model (T5, BART ...) the prompt is the encoder input (right-padded: BART's encoder
positions count from the row start) and the output is the decoder's sequence after its start token.
Decoding is greedy, beam search or sampling. A row stops once its
continuation holds a newline after some text (ALMA keeps only the first line: see
:func:`preftune.mt.prompts.clean_translation`), or at EOS / ``max_new_tokens``; rows that reach
``max_new_tokens`` without either are counted as ``truncated``.

Greedy search of a decoder-only model runs in :func:`greedy_continuous` (``engine="auto"``): a
key/value cache whose finished rows are dropped and whose free slots are refilled with the next
prompts, so a batch never waits for its longest row; it gives ``model.generate``'s greedy
tokens. Beam search, sampling, encoder–decoder models and generation configs with logits
processors use ``model.generate`` batch after batch.

Outputs follow ALMA's layout ``OUT/<model>/<src><tgt>/test.<src>-<tgt>.<tgt>``, one line per
source sentence, written in order as soon as all earlier lines are done and flushed, so an
interrupted run resumes where it stopped (a partial last line is discarded and redone).
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

import torch

from preftune.mt.prompts import clean_translation, generation_prompt

logger = logging.getLogger("preftune.mt.translate")


def output_path(out_dir: str | Path, model_name: str, src: str, tgt: str) -> Path:
    """ALMA's output file: ``out_dir/<model_name>/<src><tgt>/test.<src>-<tgt>.<tgt>``."""
    return Path(out_dir) / model_name / f"{src}{tgt}" / f"test.{src}-{tgt}.{tgt}"


def default_model_name(model: str | None, adapter: str | None) -> str:
    """Directory name for outputs: the adapter's directory name, else the model's (``.gguf``
    stem), else ``SmolLM2-135M-Instruct`` (preftune's default model)."""
    if adapter:
        return Path(adapter.rstrip("/")).name
    if model:
        p = Path(model.rstrip("/"))
        return p.stem if p.suffix == ".gguf" else p.name
    return "SmolLM2-135M-Instruct"


def load_translation_model(model: str | None, adapter: str | None = None, dtype: str = "float32"):
    """Load ``(model, tokenizer)`` for inference through :func:`preftune.models.load_model_and_tokenizer`.

    An adapter is loaded with peft and merged into the base weights (faster decoding); the model
    is put in eval mode with gradients off; the tokenizer pads on the left (on the right for an
    encoder–decoder model).
    """
    from preftune.config import ModelArguments, PeftArguments
    from preftune.models import load_model_and_tokenizer

    peft_args = PeftArguments(peft_model_id=adapter) if adapter else PeftArguments()
    lm, tok = load_model_and_tokenizer(ModelArguments(model_name_or_path=model, dtype=dtype), peft_args,
                                       training=False)
    if adapter:
        lm = lm.merge_and_unload()
    lm.eval()
    lm.requires_grad_(False)
    lm.config.use_cache = True
    tok.padding_side = "right" if _is_encoder_decoder(lm) else "left"
    return lm, tok


def _is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


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


class _StopAtNewline:
    """Stopping criterion: a row is done once its continuation has a newline after non-blank text.

    Stateless over ``input_ids``, so it is also correct under beam search, where rows are
    reordered between steps. With ``newline_mask`` (:func:`newline_token_mask`) only rows whose
    continuation holds a newline-bearing token are decoded and tested; with ``None`` every row is
    decoded every step (the original check, kept for benchmarks). Returns a bool tensor ``[rows]``.
    """

    def __init__(self, tokenizer, prompt_len: int, newline_mask: torch.BoolTensor | None = None) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.newline_mask = newline_mask

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:]
        if self.newline_mask is None:
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            return torch.tensor([_stops_at_newline(t) for t in texts], dtype=torch.bool, device=input_ids.device)
        done = torch.zeros(new.shape[0], dtype=torch.bool, device=input_ids.device)
        rows = _has_newline_token(new, self.newline_mask).any(dim=1).nonzero().flatten().tolist()
        if rows:
            texts = self.tokenizer.batch_decode(new[rows], skip_special_tokens=True)
            for r, t in zip(rows, texts):
                done[r] = _stops_at_newline(t)
        return done


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

    if _is_encoder_decoder(model):
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
    from collections import deque

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1 (got {batch_size}, {max_new_tokens})")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("an empty prompt cannot be decoded (no token to condition on)")
    quarter = max(1, batch_size // 4)
    refill_at = max(1, min(batch_size, quarter if refill_at is None else refill_at))
    compact_at = max(1, quarter if compact_at is None else compact_at)
    device = model.device
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
            out = model(input_ids=ids, attention_mask=am, position_ids=positions, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            tokens = out.logits[:, -1].to(dtype=torch.float32).argmax(dim=-1)
            del out
            start = len(batch)
            batch.join(take, cache, am, tokens)
            targets = range(start, len(batch))
        else:
            am = torch.cat([batch.mask, batch.mask.new_ones(len(batch), 1)], dim=1)
            out = model(input_ids=batch.pending[:, None], attention_mask=am, position_ids=batch.pos[:, None],
                        past_key_values=batch.cache, use_cache=True, logits_to_keep=1)
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


#: ``engine`` values of :func:`generate`.
ENGINES = ("auto", "generate", "legacy")


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 256, num_beams: int = 1,
             do_sample: bool = False, num_return_sequences: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, add_special_tokens: bool = True, batch_size: int | None = None,
             engine: str = "auto", on_result=None) -> tuple[list[list[str]], int]:
    """Generate continuations of ``prompts`` (left-padded batches; encoder–decoder models:
    right-padded encoder inputs, the decoder's output after its start token).

    ``batch_size`` rows are decoded at a time (default: all prompts in one batch). ``engine``:
    ``"auto"`` decodes greedy search (``num_beams=1``, no sampling, one sequence) with
    :func:`greedy_continuous` where :func:`greedy_loop_supported` (finished rows leave the batch,
    waiting prompts take their place) and everything else with ``model.generate``, batch after
    batch; ``"generate"`` always uses ``model.generate``; ``"legacy"`` is ``model.generate`` with
    the stop check that decodes every row every step (the code before the greedy loop, kept for
    benchmarks).

    Args:
        on_result: called as ``on_result(i, outputs_i, truncated_i)`` once prompt ``i`` is done
            (greedy loop: as each row stops; ``model.generate``: after each batch).

    Returns:
        ``(outputs, truncated)``: ``outputs[i]`` holds ``num_return_sequences`` cleaned translations
        of prompt ``i``; ``truncated`` counts sequences that hit ``max_new_tokens`` before a
        newline or EOS.

    Raises:
        ValueError: unknown ``engine``, ``batch_size`` below 1.
    """
    if engine not in ENGINES:
        raise ValueError(f"generation engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if not prompts:
        return [], 0
    batch_size = len(prompts) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    greedy = num_beams == 1 and not do_sample and num_return_sequences == 1
    if engine == "auto" and greedy and greedy_loop_supported(model):
        ids = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
        outputs: list[list[str]] = [[] for _ in prompts]

        def done(i: int, tokens: list[int], truncated: bool) -> None:
            outputs[i] = [clean_translation(tokenizer.decode(tokens, skip_special_tokens=True))]
            if on_result is not None:
                on_result(i, outputs[i], int(truncated))

        results = greedy_continuous(model, tokenizer, ids, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    on_result=done)
        return outputs, sum(t for _, t in results)
    outputs, truncated = [], 0
    for b in range(0, len(prompts), batch_size):
        outs, counts = _generate_batch(
            model, tokenizer, prompts[b:b + batch_size], max_new_tokens=max_new_tokens, num_beams=num_beams,
            do_sample=do_sample, num_return_sequences=num_return_sequences, temperature=temperature,
            top_p=top_p, add_special_tokens=add_special_tokens, legacy_stop=engine == "legacy")
        outputs.extend(outs)
        truncated += sum(counts)
        if on_result is not None:
            for k, (o, c) in enumerate(zip(outs, counts)):
                on_result(b + k, o, c)
    return outputs, truncated


def _generate_batch(model, tokenizer, prompts: list[str], *, max_new_tokens: int, num_beams: int,
                    do_sample: bool, num_return_sequences: int, temperature: float, top_p: float,
                    add_special_tokens: bool, legacy_stop: bool) -> tuple[list[list[str]], list[int]]:
    """One ``model.generate`` batch: cleaned outputs per prompt and truncated sequences per prompt."""
    from transformers import StoppingCriteriaList

    encoder_decoder = _is_encoder_decoder(model)
    tokenizer.padding_side = "right" if encoder_decoder else "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    # where the new tokens start in generate's output: after the prompt (causal), after the decoder start
    prompt_len = 1 if encoder_decoder else enc["input_ids"].shape[1]
    stop = _StopAtNewline(tokenizer, prompt_len, None if legacy_stop else newline_token_mask(tokenizer))
    kwargs = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, num_return_sequences=num_return_sequences,
                  do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                  stopping_criteria=StoppingCriteriaList([stop]))
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**enc, **kwargs)
    new = out[:, prompt_len:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    n = num_return_sequences
    counts = [0] * len(prompts)
    for k, (row, text) in enumerate(zip(new.tolist(), texts)):
        if len(row) >= max_new_tokens and not _stops_at_newline(text) and not eos_ids.intersection(row):
            counts[k // n] += 1
    cleaned = [clean_translation(t) for t in texts]
    return [cleaned[i * n:(i + 1) * n] for i in range(len(prompts))], counts


def _resume_count(path: Path) -> int:
    """Complete lines already in ``path``; a partial last line is cut off (it is redone)."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        path.write_bytes(data[:keep])
        data = data[:keep]
        logger.warning("%s: dropped a partial last line; it will be translated again", path)
    return data.count(b"\n")


def length_order(prompts: list[str], window: int, start: int = 0) -> list[int]:
    """Indices ``start ..`` of ``prompts`` in windows of ``window``, each window sorted by prompt
    length (characters; stable), the order :func:`translate_to_file` decodes in."""
    window = max(1, window)
    order: list[int] = []
    for w in range(start, len(prompts), window):
        order += sorted(range(w, min(w + window, len(prompts))), key=lambda i: len(prompts[i]))
    return order


def translate_to_file(model, tokenizer, sources: list[str], src: str, tgt: str, out_file: str | Path, *,
                      batch_size: int = 16, max_new_tokens: int = 256, num_beams: int = 1,
                      chat_style: bool = False, progress: bool = True, sort_window: int = 4,
                      engine: str = "auto") -> dict:
    """Translate ``sources`` into ``out_file`` (one line each), resuming after existing lines.

    Sentences are taken in windows of ``batch_size * sort_window``, sorted by prompt length inside
    each window (less padding), and decoded by :func:`generate` (``engine``; greedy: finished rows
    are replaced by the next sentences at once). Lines are written in the original order as soon
    as every earlier line is done, and flushed, so an interrupted run loses at most the lines
    still in flight.

    Returns:
        ``{"total", "already_done", "translated", "empty", "truncated", "file"}``.

    Raises:
        ValueError: the output already has more lines than there are sources; unknown ``engine``.
    """
    from tqdm import tqdm

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    done = _resume_count(out_file)
    if done > len(sources):
        raise ValueError(f"{out_file} has {done} lines but there are only {len(sources)} sources; "
                         "remove it or use the same input / --limit")
    prompts = [generation_prompt(tokenizer, src, tgt, s, chat_style) for s in sources]
    stats = {"total": len(sources), "already_done": done, "translated": 0, "empty": 0, "truncated": 0,
             "file": str(out_file)}
    order = length_order(prompts, batch_size * max(1, sort_window), start=done)
    results: dict[int, str] = {}
    next_line = done
    bar = tqdm(total=len(sources), initial=done, desc=f"{src}-{tgt}", unit="sent", disable=not progress)
    with out_file.open("a", encoding="utf-8") as fh:

        def write(k: int, outs: list[str], truncated: int) -> None:
            nonlocal next_line
            results[order[k]] = outs[0]
            stats["truncated"] += truncated
            bar.update(1)
            if next_line not in results:
                return
            while next_line in results:
                line = results.pop(next_line)
                stats["empty"] += not line
                stats["translated"] += 1
                fh.write(line + "\n")
                next_line += 1
            fh.flush()

        generate(model, tokenizer, [prompts[i] for i in order], max_new_tokens=max_new_tokens,
                 num_beams=num_beams, add_special_tokens=not chat_style, batch_size=batch_size,
                 engine=engine, on_result=write)
    bar.close()
    return stats


def generate_candidates(model, tokenizer, sources: list[str], src: str, tgt: str, *, n: int,
                        mode: str = "beam", batch_size: int = 8, max_new_tokens: int = 256,
                        chat_style: bool = False, temperature: float = 0.7, top_p: float = 0.95,
                        progress: bool = True) -> tuple[list[list[str]], int]:
    """n-best candidate translations of each source: beam search (``num_beams = n``, the n best
    beams) or ancestral sampling (``n`` samples, temperature / nucleus ``top_p``).

    Returns:
        ``(candidates, truncated)`` with ``candidates[i]`` the ``n`` translations of ``sources[i]``.

    Raises:
        ValueError: unknown ``mode`` or ``n < 1``.
    """
    from tqdm import tqdm

    if mode not in ("beam", "sample"):
        raise ValueError(f"generation mode {mode!r}: choose beam or sample")
    if n < 1:
        raise ValueError(f"number of candidates must be >= 1, got {n}")
    prompts = [generation_prompt(tokenizer, src, tgt, s, chat_style) for s in sources]
    out: list[list[str]] = []
    truncated = 0
    for b in tqdm(range(0, len(prompts), batch_size), desc=f"candidates {src}-{tgt}", disable=not progress):
        outs, t = generate(model, tokenizer, prompts[b:b + batch_size], max_new_tokens=max_new_tokens,
                           num_beams=n if mode == "beam" else 1, do_sample=mode == "sample",
                           num_return_sequences=n, temperature=temperature, top_p=top_p,
                           add_special_tokens=not chat_style)
        out.extend(outs)
        truncated += t
    return out, truncated
