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


def save_tiny_model(path, layers: int = 2, chat_template: str | None = None) -> str:
    """A tiny random Llama (``layers`` layers, 2048 positions) and a byte tokenizer (with ``chat_template``
    when given) saved in ``path``."""
    tok = byte_tokenizer()
    if chat_template is not None:
        tok.chat_template = chat_template
    model = tiny_llama(vocab_size=len(tok), layers=layers)
    model.config.max_position_embeddings = 2048
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def random_pairs(n, vocab=96, seed=0, max_len=9):
    """``n`` random :class:`TokenizedPair` (token ids 3..vocab-1, 1..max_len tokens per part)."""
    import random

    from preftune.types import TokenizedPair

    rng = random.Random(seed)

    def seq(lo):
        return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, max_len))]

    return [TokenizedPair(seq(1), seq(1), seq(1)) for _ in range(n)]


def naive_logps(model, pairs):
    """Each sequence alone, unpadded, full logits, log_softmax, summed over its completion."""
    out_c, out_r = [], []
    for p in pairs:
        for comp, out in ((p.chosen_ids, out_c), (p.rejected_ids, out_r)):
            ids = torch.tensor([p.prompt_ids + comp])
            logits = model(input_ids=ids).logits[0].float()
            logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            out.append(logp[len(p.prompt_ids) - 1:].sum())
    return torch.stack(out_c), torch.stack(out_r)


def random_logp_batch(b: int, seed: int, max_len: int = 40, spread: float = 2.0, noise: float = 3.0):
    """Per-sequence inputs of a loss, float64 ``(b,)`` each: policy sums of chosen / rejected completions
    (``-len * U(0.05, 0.05 + spread)`` nats), their token counts (1..max_len-1) and reference sums (the
    policy's + ``noise`` * N(0, 1)). Returns ``(chosen, rejected, chosen_len, rejected_len, ref_c, ref_r)``."""
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(1, max_len, (b,), generator=g).double()
    lr = torch.randint(1, max_len, (b,), generator=g).double()
    c = -lc * (0.05 + spread * torch.rand(b, generator=g, dtype=torch.float64))
    r = -lr * (0.05 + spread * torch.rand(b, generator=g, dtype=torch.float64))
    rc = c + torch.randn(b, generator=g, dtype=torch.float64) * noise
    rr = r + torch.randn(b, generator=g, dtype=torch.float64) * noise
    return c, r, lc, lr, rc, rr


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory with a tiny random Llama and a byte tokenizer, loadable by --model_name_or_path."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), layers=2)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep the tests' reference-log-prob cache out of the user's ~/.cache (the GGUF conversion cache
    stays shared so the real model is converted once per machine)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFTUNE_REF_CACHE", str(tmp_path_factory.mktemp("ref-cache")))
    yield
    mp.undo()
