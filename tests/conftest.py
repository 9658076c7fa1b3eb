import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama(vocab_size: int = 96, tie: bool = False, attn: str = "sdpa", seed: int = 0, layers: int = 2):
    """A tiny random Llama built from a config (no downloads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, attn_implementation=attn, pad_token_id=0, eos_token_id=2,
                         bos_token_id=1)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture
def make_tiny_llama():
    return tiny_llama
