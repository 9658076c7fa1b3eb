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


def byte_tokenizer():
    """A byte-level tokenizer (259 ids: <pad>, <s>, </s>, then the 256 bytes) built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() order varies per process
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory with a tiny random Llama and a byte tokenizer, loadable by --model_name_or_path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = byte_tokenizer()
    model = tiny_llama(vocab_size=len(tok), layers=2)
    model.config.max_position_embeddings = 2048
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep the tests' reference-log-prob cache out of the user's ~/.cache (the GGUF conversion cache
    stays shared so the real model is converted once per machine)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFTUNE_REF_CACHE", str(tmp_path_factory.mktemp("ref-cache")))
    yield
    mp.undo()
