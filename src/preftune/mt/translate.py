"""Batched translation with a causal LM or an encoder–decoder LM (base model, or base + LoRA adapter).

Prompts are ALMA's (:mod:`preftune.mt.prompts`); for a causal LM inputs are left-padded so every
row's prompt ends at the same position and the continuation is what follows the prompt; for an
encoder–decoder model (T5, BART ...) the prompt is the encoder input (right-padded: BART's encoder
positions count from the row start) and the output is the decoder's sequence after its start token.
Decoding is greedy, beam search or sampling. A row stops once its
continuation holds a newline after some text (ALMA keeps only the first line: see
:func:`preftune.mt.prompts.clean_translation`), or at EOS / ``max_new_tokens``; rows that reach
``max_new_tokens`` without either are counted as ``truncated``.

Outputs follow ALMA's layout ``OUT/<model>/<src><tgt>/test.<src>-<tgt>.<tgt>``, one line per
source sentence, written chunk by chunk and flushed, so an interrupted run resumes where it
stopped (a partial last line is discarded and redone).
"""

from __future__ import annotations

import logging
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


class _StopAtNewline:
    """Stopping criterion: a row is done once its continuation has a newline after non-blank text.

    Stateless (decodes the continuation each step), so it is also correct under beam search,
    where rows are reordered between steps. Returns a bool tensor ``[rows]``.
    """

    def __init__(self, tokenizer, prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 256, num_beams: int = 1,
             do_sample: bool = False, num_return_sequences: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, add_special_tokens: bool = True) -> tuple[list[list[str]], int]:
    """Generate continuations of ``prompts`` (one batch, left-padded; encoder–decoder models:
    right-padded encoder inputs, the decoder's output after its start token).

    Returns:
        ``(outputs, truncated)``: ``outputs[i]`` holds ``num_return_sequences`` cleaned translations
        of prompt ``i``; ``truncated`` counts sequences that hit ``max_new_tokens`` before a
        newline or EOS.
    """
    from transformers import StoppingCriteriaList

    encoder_decoder = _is_encoder_decoder(model)
    tokenizer.padding_side = "right" if encoder_decoder else "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    # where the new tokens start in generate's output: after the prompt (causal), after the decoder start
    prompt_len = 1 if encoder_decoder else enc["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, num_return_sequences=num_return_sequences,
                  do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                  stopping_criteria=StoppingCriteriaList([_StopAtNewline(tokenizer, prompt_len)]))
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**enc, **kwargs)
    new = out[:, prompt_len:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    truncated = 0
    for row, text in zip(new.tolist(), texts):
        if len(row) >= max_new_tokens and "\n" not in text.lstrip() and not eos_ids.intersection(row):
            truncated += 1
    cleaned = [clean_translation(t) for t in texts]
    n = num_return_sequences
    return [cleaned[i * n:(i + 1) * n] for i in range(len(prompts))], truncated


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


def translate_to_file(model, tokenizer, sources: list[str], src: str, tgt: str, out_file: str | Path, *,
                      batch_size: int = 16, max_new_tokens: int = 256, num_beams: int = 1,
                      chat_style: bool = False, progress: bool = True, sort_window: int = 4) -> dict:
    """Translate ``sources`` into ``out_file`` (one line each), resuming after existing lines.

    Work is done in chunks of ``batch_size * sort_window`` sentences; inside a chunk, sentences
    are batched by source length (less padding, shorter decodes), and the chunk is written in the
    original order and flushed before the next starts.

    Returns:
        ``{"total", "already_done", "translated", "empty", "truncated", "file"}``.

    Raises:
        ValueError: the output already has more lines than there are sources.
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
    chunk = max(1, batch_size * max(1, sort_window))
    bar = tqdm(total=len(sources), initial=done, desc=f"{src}-{tgt}", unit="sent", disable=not progress)
    with out_file.open("a", encoding="utf-8") as fh:
        for start in range(done, len(sources), chunk):
            idx = list(range(start, min(start + chunk, len(sources))))
            idx_sorted = sorted(idx, key=lambda i: len(prompts[i]))
            results: dict[int, str] = {}
            for b in range(0, len(idx_sorted), batch_size):
                batch = idx_sorted[b:b + batch_size]
                outs, trunc = generate(model, tokenizer, [prompts[i] for i in batch],
                                       max_new_tokens=max_new_tokens, num_beams=num_beams,
                                       add_special_tokens=not chat_style)
                stats["truncated"] += trunc
                for i, o in zip(batch, outs):
                    results[i] = o[0]
                bar.update(len(batch))
            for i in idx:
                stats["empty"] += not results[i]
                fh.write(results[i] + "\n")
            fh.flush()
            stats["translated"] += len(idx)
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
