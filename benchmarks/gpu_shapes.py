"""Model shapes, a tokenizer and synthetic pairs for the GPU check (``scripts/gpu_check.sh``): no downloads.

The shapes are the sizes of real models (their ``config.json``: widths, depths, heads, vocabulary),
never their weights; every model is random-initialised from its config.

* ``tiny``: a 2-layer Llama (hidden 64) for the CPU dry run;
* ``qwen2.5-0.5b``: Qwen/Qwen2.5-0.5B (494 M parameters, tied embeddings);
* ``llama-3.2-1b``: meta-llama/Llama-3.2-1B (1.24 B parameters, tied embeddings).

The tokenizer is byte-level and built in memory (259 ids: ``<pad>``, ``<s>``, ``</s>``, then the 256
bytes; one token per ASCII character); the real shapes keep their own (larger) vocabulary, so the LM
head costs what it costs in the real model.
"""

from __future__ import annotations

import random
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0),
    # https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json (sizes only)
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6,
                         rope_theta=1000000.0),
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json (sizes only)
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}

# Dense bf16 peak of the GPUs this check may meet (FLOP/s, without sparsity), for MFU.
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "H800": 989.4e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "RTX 4090": 165.2e12}


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name, or None (unknown GPU, or the CPU)."""
    for key, value in PEAK_BF16.items():
        if key.lower() in device_name.lower():
            return value
    return None


def byte_tokenizer():
    """A byte-level tokenizer built in memory (as ``tests/conftest.py``): 259 ids, pad 0, bos 1, eos 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_config(shape: str, *, num_labels: int | None = None, attn: str = "sdpa", initializer_range: float | None = None):
    """The transformers config of ``shape`` (pad 0, bos 1, eos 2 as the byte tokenizer; no dropout)."""
    from transformers import AutoConfig

    kw = dict(SHAPES[shape])
    model_type = kw.pop("model_type")
    kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=0.0, use_cache=False)
    if initializer_range is not None:
        kw["initializer_range"] = initializer_range
    if num_labels is not None:
        kw["num_labels"] = num_labels
    config = AutoConfig.for_model(model_type, **kw)
    config._attn_implementation = attn
    return config


def make_model(shape: str, *, dtype=None, device=None, seed: int = 0, reward: bool = False,
               initializer_range: float | None = None, attn: str = "sdpa"):
    """A random-initialised causal LM (or a 1-label sequence classifier with ``reward``) of ``shape``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = make_config(shape, num_labels=1 if reward else None, attn=attn, initializer_range=initializer_range)
    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    with torch.device(device or "cpu"):
        model = cls.from_config(config, dtype=dtype or torch.float32)
    return model


def save_model_dir(shape: str, path, *, dtype=None, seed: int = 0) -> str:
    """A directory with a random-initialised model of ``shape`` and the byte tokenizer (``--model_name_or_path``)."""
    model = make_model(shape, dtype=dtype, seed=seed)
    model.save_pretrained(str(path))
    byte_tokenizer().save_pretrained(str(path))
    return str(path)


def _text(rng: random.Random, n_chars: int) -> str:
    words = []
    while sum(len(w) + 1 for w in words) < n_chars:
        words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))))
    return " ".join(words)[:n_chars]


def synthetic_records(n: int, length: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` pairs of random words filling ``length`` tokens of the byte tokenizer as the hh-long pairs of
    ``bench_data``: prompt ``length/2`` tokens, chosen and rejected ``length/4 - 2`` each (room for BOS and
    EOS), so ``[P C] = [P R] ≈ 3/4 length`` and the shared-prompt unit ``[P C R] ≈ length``. Completions start
    with a space (no token merges across the boundary)."""
    rng = random.Random(seed)
    quarter = max(4, length // 4 - 2)
    return [{"prompt": _text(rng, length // 2), "chosen": " " + _text(rng, quarter - 1),
             "rejected": " " + _text(rng, quarter - 1)} for _ in range(n)]


def n_params(shape: str) -> dict[str, int]:
    """Parameter counts of ``shape`` from its sizes: total, and without the input embedding (for MFU)."""
    s = SHAPES[shape]
    d, f, L, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    hd = s.get("head_dim", d // s["num_attention_heads"])
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    bias = (q + 2 * kv) if s["model_type"] == "qwen2" else 0
    layer = d * q + 2 * d * kv + q * d + bias + 3 * d * f + 2 * d
    emb = v * d
    head = 0 if s["tie_word_embeddings"] else v * d
    total = emb + L * layer + d + head
    return {"total": total, "non_embedding_with_head": L * layer + d + v * d}


def train_flops_per_token(shape: str, context: int) -> float:
    """Model FLOPs per trained token: ``6 N`` (N without the input embedding, with the LM head) plus causal
    attention ``6 · layers · (heads · head_dim) · context`` (PaLM's estimate, halved for the causal mask)."""
    s = SHAPES[shape]
    hd = s.get("head_dim", s["hidden_size"] // s["num_attention_heads"])
    return 6.0 * n_params(shape)["non_embedding_with_head"] + 6.0 * s["num_hidden_layers"] * s["num_attention_heads"] * hd * context
