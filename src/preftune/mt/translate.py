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
from pathlib import Path

import torch

from preftune.engine.kinds import kind_for
from preftune.mt.decode import (  # noqa: F401 - re-exported: the translate module's public names
    _has_newline_token,
    _stops_at_newline,
    greedy_continuous,
    greedy_loop_supported,
    newline_token_mask,
)
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


def load_translation_model(model: str | None, adapter: str | None = None, dtype: str = "float32",
                           device: str = "auto"):
    """Load ``(model, tokenizer)`` for inference through :func:`preftune.models.load_model_and_tokenizer`,
    on ``device`` (:class:`preftune.device.DevicePolicy`: ``auto`` is the GPU when there is one; there
    ``--dtype auto`` is bfloat16 / float16, float32 on the CPU).

    An adapter is loaded with peft and merged into the base weights (faster decoding); the model
    is put in eval mode with gradients off; the tokenizer pads on the left (on the right for an
    encoder–decoder model).
    """
    from preftune.config import ModelArguments, PeftArguments
    from preftune.device import DevicePolicy
    from preftune.models import load_model_and_tokenizer

    policy = DevicePolicy.of(device)
    peft_args = PeftArguments(peft_model_id=adapter) if adapter else PeftArguments()
    lm, tok = load_model_and_tokenizer(ModelArguments(model_name_or_path=model, dtype=policy.model_dtype(dtype)),
                                       peft_args, training=False)
    if adapter:
        lm = lm.merge_and_unload()
    lm.to(policy.device)
    lm.eval()
    lm.requires_grad_(False)
    lm.config.use_cache = True
    tok.padding_side = "left" if kind_for(lm).generates_after_prompt else "right"
    return lm, tok


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

    after_prompt = kind_for(model).generates_after_prompt
    tokenizer.padding_side = "left" if after_prompt else "right"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    # where the new tokens start in generate's output: after the prompt (causal), after the decoder start
    prompt_len = enc["input_ids"].shape[1] if after_prompt else 1
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
