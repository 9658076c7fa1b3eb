"""The engine's layouts give the same per-sequence log-probs and gradients as a naive full-logits path."""


import pytest
import torch
from conftest import naive_logps, random_pairs

from preftune.engine.layout import build_attention_mask, collate_pairs
from preftune.engine.lm_head import token_logps
from preftune.engine.logprobs import sequence_logps
from preftune.types import TokenizedPair

LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]




@pytest.mark.parametrize("share_prompt,padding_free", LAYOUTS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("tie", [False, True])
def test_layouts_match_naive_logps_and_grads(make_tiny_llama, share_prompt, padding_free, attn, tie):
    model = make_tiny_llama(tie=tie, attn=attn)
    pairs = random_pairs(5, 96, seed=1)
    ref_c, ref_r = naive_logps(model, pairs)
    (ref_c.sum() - 0.5 * ref_r.sum()).backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    batch = collate_pairs(pairs, share_prompt=share_prompt, padding_free=padding_free, max_tokens_per_batch=24)
    out = sequence_logps(model, batch, chunk_size=7)
    torch.testing.assert_close(out.chosen_logps, ref_c, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.rejected_logps, ref_r, atol=1e-4, rtol=0)
    assert out.chosen_lengths.tolist() == [len(p.chosen_ids) for p in pairs]
    assert out.rejected_lengths.tolist() == [len(p.rejected_ids) for p in pairs]
    (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
    for g_ref, p in zip(ref_grads, model.parameters()):
        torch.testing.assert_close(p.grad, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("share_prompt,padding_free", LAYOUTS)
def test_mask_kernel_matches_naive_logps_and_grads(make_tiny_llama, share_prompt, padding_free):
    """--packed_attention mask (4-D mask to the model's SDPA) gives the naive numbers too; the default
    (blockwise) is covered by test_layouts_match_naive_logps_and_grads."""
    from preftune.engine.options import configure_engine

    model = make_tiny_llama(tie=True)
    configure_engine(model, packed_attention="mask")
    pairs = random_pairs(4, 96, seed=3)
    ref_c, ref_r = naive_logps(model, pairs)
    (ref_c.sum() - 0.5 * ref_r.sum()).backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    batch = collate_pairs(pairs, share_prompt=share_prompt, padding_free=padding_free, max_tokens_per_batch=24)
    out = sequence_logps(model, batch, chunk_size=7)
    torch.testing.assert_close(out.chosen_logps, ref_c, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.rejected_logps, ref_r, atol=1e-4, rtol=0)
    (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
    for g_ref, p in zip(ref_grads, model.parameters()):
        torch.testing.assert_close(p.grad, g_ref, atol=1e-5, rtol=1e-4)


def test_shared_prompt_computes_prompt_once_and_packs():
    pairs = [TokenizedPair([5, 6, 7], [8, 9], [10]), TokenizedPair([5], [8], [9, 9, 9])]
    plain = collate_pairs(pairs, share_prompt=False, padding_free=False)
    shared = collate_pairs(pairs, share_prompt=True, padding_free=True)
    assert (plain["segment_ids"] >= 0).sum() == 2 * 3 + 2 + 1 + 2 * 1 + 1 + 3
    assert (shared["segment_ids"] >= 0).sum() == 3 + 2 + 1 + 1 + 1 + 3
    # unit [5 6 7 | 8 9 | 10]: rejected restarts at position 3 and is predicted from the last prompt token
    row = shared["input_ids"].tolist()
    assert [5, 6, 7, 8, 9, 10] in [r[i:i + 6] for r in row for i in range(len(r) - 5)]
    assert int(shared["num_logical_tokens"]) == plain["segment_ids"].ge(0).sum()


def test_mask_blocks_chosen_from_rejected():
    batch = collate_pairs([TokenizedPair([5, 6], [7, 8], [9, 10])], share_prompt=True, padding_free=False)
    mask = build_attention_mask(batch["segment_ids"], batch["branch_ids"], packed=True)[0, 0]
    # tokens: P0 P1 C0 C1 R0 R1
    assert mask[4, :4].tolist() == [True, True, False, False]
    assert mask[5].tolist() == [True, True, False, False, True, True]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 2, 3]


def test_token_logps_chunked_equals_full_and_keeps_no_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    h = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 300, (50,))
    full = torch.log_softmax(head(h), -1).gather(-1, t[:, None]).squeeze(-1)
    g_full = torch.autograd.grad(full.sum(), [h, head.weight])
    chunked = token_logps(head, h, t, chunk_size=8)
    g_chunk = torch.autograd.grad(chunked.sum(), [h, head.weight])
    torch.testing.assert_close(chunked, full)
    for a, b in zip(g_chunk, g_full):
        torch.testing.assert_close(a, b)
    # with checkpointing, no (chunk, V) tensor is saved for backward
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        token_logps(head, h, t, chunk_size=8)
    assert all(300 not in shape for shape in saved), saved


def test_empty_prompt_rejected():
    with pytest.raises(ValueError, match="empty prompt"):
        collate_pairs([TokenizedPair([], [1], [2])])


LOSS_CONFIGS = [("cpo", {}), ("cpo", {"cpo_loss_type": "hinge"}), ("cpo", {"cpo_loss_type": "ipo"}),
                ("simpo", {}), ("cpo-simpo", {}), ("orpo", {}), ("dpo", {}), ("dpo", {"dpo_loss_type": "ipo"}),
                ("dpo", {"dpo_loss_type": "hinge"}), ("dpo", {"dpo_loss_type": "robust", "label_smoothing": 0.1}),
                ("dpo", {"rpo_alpha": 1.0}), ("sft", {})]


@pytest.mark.parametrize("loss,extra", LOSS_CONFIGS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_every_loss_same_on_every_layout(make_tiny_llama, loss, extra):
    """Loss value (rel 1e-5) and parameter gradients agree between the plain padded path and every other layout."""
    from preftune.config import LossArguments
    from preftune.losses import compute_loss

    args = LossArguments(loss=loss, **extra)
    model = make_tiny_llama(tie=True)
    pairs = random_pairs(4, 96, seed=7)
    gen = torch.Generator().manual_seed(0)
    ref = (-torch.rand(4, generator=gen) * 20, -torch.rand(4, generator=gen) * 20)
    results = []
    for share_prompt, padding_free in LAYOUTS:
        model.zero_grad()
        batch = collate_pairs(pairs, share_prompt=share_prompt, padding_free=padding_free)
        logps = sequence_logps(model, batch, chunk_size=5)
        logps.ref_chosen_logps, logps.ref_rejected_logps = ref
        value = compute_loss(logps, args).losses.mean()
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in model.parameters()]))
    base_loss, base_grads = results[0]
    for value, grads in results[1:]:
        torch.testing.assert_close(value, base_loss, rtol=1e-5, atol=1e-6)
        for g, g0 in zip(grads, base_grads):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-5)


def test_flex_mask_mod_equals_dense_mask():
    from preftune.engine.layout import make_mask_mod

    batch = collate_pairs(random_pairs(5, 96, seed=2), share_prompt=True, padding_free=True, max_tokens_per_batch=30)
    seg, br = batch["segment_ids"], batch["branch_ids"]
    rows, t = seg.shape
    b = torch.arange(rows)[:, None, None]
    q = torch.arange(t)[None, :, None]
    k = torch.arange(t)[None, None, :]
    got = make_mask_mod(seg, br)(b, None, q, k)
    want = build_attention_mask(seg, br, packed=True)[:, 0]
    assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention is compiled for GPU; torch 2.13's CPU "
                    "inductor fails on some shapes (CppCompileError), so the end-to-end check runs on CUDA")
@pytest.mark.parametrize("share_prompt", [True, False])
def test_flex_attention_block_mask_matches_naive(make_tiny_llama, share_prompt):
    """FlexAttention with a BlockMask, end to end (GPU)."""
    model = make_tiny_llama(attn="flex_attention").cuda()
    pairs = random_pairs(3, 96, seed=4)
    with torch.no_grad():
        ref_c, ref_r = naive_logps(make_tiny_llama(attn="sdpa"), pairs)
        batch = collate_pairs(pairs, share_prompt=share_prompt, padding_free=True, max_tokens_per_batch=40)
        out = sequence_logps(model, {k: v.cuda() for k, v in batch.items()})
    torch.testing.assert_close(out.chosen_logps.cpu(), ref_c, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.rejected_logps.cpu(), ref_r, atol=1e-4, rtol=0)


def test_flash_attention_inputs_by_layout(make_tiny_llama):
    """Flash kernels: packed rows get the units' varlen boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``;
    transformers reads boundaries from ``position_ids`` only at batch size 1); shared-prompt rows, which
    no varlen call can express, go to the blockwise path on CPU (tests/test_attention_paths.py runs both)."""
    from preftune.engine.attention import attention_inputs
    from preftune.engine.layout import varlen_boundaries

    model = make_tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    shared = collate_pairs(random_pairs(2, 96), share_prompt=True, padding_free=True)
    assert hasattr(attention_inputs(model, shared)["attention_mask"], "preftune_layout")
    packed = collate_pairs(random_pairs(4, 96), share_prompt=False, padding_free=True, max_tokens_per_batch=12)
    kwargs = attention_inputs(model, packed)
    cu, longest = varlen_boundaries(packed["segment_ids"])
    assert kwargs["attention_mask"] is None and torch.equal(kwargs["cu_seq_lens_q"], cu)
    assert torch.equal(kwargs["cu_seq_lens_k"], cu) and kwargs["max_length_q"] == kwargs["max_length_k"] == longest


def test_auto_chunk_size_bounds_block_memory():
    from preftune.engine.lm_head import LOGITS_PER_CHUNK, auto_chunk_size

    for vocab in (32_000, 49_152, 128_000, 256_000):
        rows = auto_chunk_size(vocab)
        assert rows * vocab <= LOGITS_PER_CHUNK and (rows + 1) * vocab > LOGITS_PER_CHUNK
    assert auto_chunk_size(10**9) == 16
