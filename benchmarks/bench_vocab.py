"""Vocabulary sweep: peak RSS of one CPO training step, preftune vs TRL, as the vocabulary grows.

A tiny random Llama (hidden 256, 2 layers, untied head, LoRA r=16 on all linear layers, activation
checkpointing) with ``V`` = 32k / 128k / 256k, and one fixed synthetic batch of ``batch`` pairs
(prompt ``prompt_len`` tokens, chosen / rejected ``completion_len`` tokens, ids drawn below 32,000 so
the batch is the same for every ``V``). TRL's CPOTrainer materialises ``(2B, T, V)`` logits and
their log-softmax; preftune gathers the completion positions and runs the head in chunks. Run by
``bench_worker.py`` (kind ``vocab``), one process per measurement.
"""

from __future__ import annotations

import tempfile
import time

import torch


def synthetic_pairs(batch: int, prompt_len: int, completion_len: int, seed: int = 0) -> list[tuple]:
    """``batch`` pairs of token-id lists ``(prompt, chosen, rejected)``, ids in [3, 32000), fixed seed."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, 32000, (n,), generator=g).tolist()

    return [(ids(prompt_len), ids(completion_len), ids(completion_len)) for _ in range(batch)]


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         pad_token_id=2, bos_token_id=None, eos_token_id=2)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def _train_kwargs(out_dir: str, batch: int) -> dict:
    return dict(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=1, learning_rate=5e-6,
                logging_steps=1000, save_strategy="no", report_to="none", seed=0, bf16=False, fp16=False,
                train_sampling_strategy="sequential", activation_checkpointing=True, disable_tqdm=True,
                remove_unused_columns=False)


def _preftune_trainer(model, pairs, out_dir, batch, chunk=None):
    from preftune.cli_args import PreftuneTrainingArguments
    from preftune.config import EngineArguments, LossArguments, PeftArguments
    from preftune.models import prepare_for_gradient_checkpointing
    from preftune.models.peft import apply_peft
    from preftune.trainer import PreferenceTrainer
    from preftune.types import TokenizedPair

    model = apply_peft(model, PeftArguments(use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0))
    prepare_for_gradient_checkpointing(model)
    data = [TokenizedPair(list(p), list(c), list(r)) for p, c, r in pairs]
    return PreferenceTrainer(model=model, args=PreftuneTrainingArguments(**_train_kwargs(out_dir, batch)),
                             train_dataset=data, loss_args=LossArguments(loss="cpo"),
                             engine_args=EngineArguments(logprob_chunk_size=chunk), pad_token_id=2)


def _trl_trainer(model, pairs, out_dir, batch):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PreTrainedTokenizerFast
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    class IdsCPOTrainer(CPOTrainer):
        """TRL's CPOTrainer fed token ids directly (a random model has no tokenizer)."""

        def tokenize_row(self, feature, model=None):
            p, c, r = feature["p_ids"], feature["c_ids"], feature["r_ids"]
            row = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
            for name, ids in (("chosen", c), ("rejected", r)):
                row[f"{name}_input_ids"] = p + ids
                row[f"{name}_attention_mask"] = [1] * (len(p) + len(ids))
                row[f"{name}_labels"] = [-100] * len(p) + ids
            return row

    tok = PreTrainedTokenizerFast(tokenizer_object=_tiny_tokenizer(), pad_token="<pad>", eos_token="<pad>")
    data = Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r", "p_ids": p, "c_ids": c, "r_ids": r}
                              for p, c, r in pairs])
    args = CPOConfig(**_train_kwargs(out_dir, batch), max_length=4096, beta=0.1, cpo_alpha=1.0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return IdsCPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "<pad>": 2}, unk_token="<unk>"))


def run_vocab(spec: dict) -> dict:
    """One measurement: ``spec`` has ``tool``, ``vocab``, ``batch``, ``prompt_len``, ``completion_len``."""
    from bench_worker import peak_rss_mb, reset_peak_rss, rss_mb

    pairs = synthetic_pairs(spec["batch"], spec["prompt_len"], spec["completion_len"])
    model = tiny_llama(spec["vocab"])
    with tempfile.TemporaryDirectory(prefix="ptbench-vocab-") as out_dir:
        if spec["tool"] == "trl":
            trainer = _trl_trainer(model, pairs, out_dir, spec["batch"])
        else:  # "preftune" (default --logprob_chunk_size: auto) or "preftune-chunk<N>"
            chunk = int(spec["tool"].removeprefix("preftune-chunk")) if "chunk" in spec["tool"] else None
            trainer = _preftune_trainer(model, pairs, out_dir, spec["batch"], chunk)
        losses = []
        original = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            out = original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

        trainer.compute_loss = compute_loss
        rss_before = rss_mb()
        reset_peak_rss()
        t0 = time.perf_counter()
        trainer.train()
        step_s = time.perf_counter() - t0
        peak = peak_rss_mb()
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return {"rss_before_train_mb": rss_before, "peak_rss_train_mb": peak, "step_s": step_s, "loss": losses[0],
            "n_params": n_params}
