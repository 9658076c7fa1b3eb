"""Every attention path of the engine (:func:`preftune.engine.attention.attention_path`) gives the naive
log-probs, and the naive gradients where its kernel has a CPU backward, on packed and shared-prompt
batches of a tiny random Llama.

The flash varlen path runs through ``varlen_reference``, an attention function registered with
transformers' ``AttentionInterface`` under a "flash" name: it receives exactly the keyword arguments
transformers hands a flash kernel (``cu_seq_lens_q/k``, ``max_length_q/k``) and computes causal
attention per segment in plain torch, so a wrong boundary changes the numbers.
"""

import logging

import pytest
import torch
from conftest import naive_logps, random_pairs

from preftune.device import DevicePolicy
from preftune.engine import attention as attention_module
from preftune.engine.attention import attention_inputs, attention_path
from preftune.engine.block_attention import block_attention, build_block_layout
from preftune.engine.layout import collate_pairs, varlen_boundaries
from preftune.engine.logprobs import sequence_logps
from preftune.engine.options import EngineOptions, configure_engine
from preftune.types import TokenizedPair

REFERENCE = "flash_varlen_reference"
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]  # (share_prompt, padding_free)
CPU, CUDA = DevicePolicy(torch.device("cpu")), DevicePolicy(torch.device("cuda"))




def naive_reference(make_tiny_llama, pairs, grads=True):
    """Naive log-probs (and gradients of ``chosen - 0.5 rejected``) of the sdpa tiny Llama of seed 0."""
    model = make_tiny_llama(tie=True)
    ref_c, ref_r = naive_logps(model, pairs)
    if not grads:
        return ref_c.detach(), ref_r.detach(), None
    (ref_c.sum() - 0.5 * ref_r.sum()).backward()
    return ref_c.detach(), ref_r.detach(), [p.grad.clone() for p in model.parameters()]


def check(model, batch, ref, grads=True):
    ref_c, ref_r, ref_grads = ref
    out = sequence_logps(model, batch, chunk_size=7)
    torch.testing.assert_close(out.chosen_logps, ref_c, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.rejected_logps, ref_r, atol=1e-4, rtol=0)
    if grads:
        (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
        for g_ref, p in zip(ref_grads, model.parameters()):
            torch.testing.assert_close(p.grad, g_ref, atol=1e-5, rtol=1e-4)


# ---- the reference flash kernel ----------------------------------------------------------------------
CALLS: list[dict] = []


def _causal(q, k, v, scale, keep=None):
    """``(H, n, D)`` causal softmax attention in float32 (``keep``: ``(n,)`` bool keys, padding off)."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    n = q.shape[-2]
    ok = torch.ones(n, n, dtype=torch.bool).tril()
    if keep is not None:
        ok = ok & keep[None, :]
        ok = ok | torch.eye(n, dtype=torch.bool)  # a padding query sees itself (never read)
    return torch.matmul(torch.softmax(s.masked_fill(~ok, float("-inf")), -1), v.float()).to(q.dtype)


def varlen_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                     softcap=None, is_causal=None, **kwargs):
    """A flash kernel's contract in plain torch: ``query`` ``(B, Hq, T, D)``; with ``cu_seq_lens_q/k`` and
    ``max_length_q/k`` the B*T tokens read flat are causal segments; else a 2-D padding mask or
    none (plain causal rows). Returns ``(B, T, Hq, D)``."""
    CALLS.append({k: kwargs[k] for k in VARLEN_KEYS if kwargs.get(k) is not None})
    b, hq, t, d = query.shape
    rep = hq // key.shape[1]
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scale = scaling if scaling is not None else d ** -0.5
    if all(kwargs.get(x) is not None for x in VARLEN_KEYS):
        cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and int(cu_q[-1]) == b * t
        assert kwargs["max_length_q"] == kwargs["max_length_k"] == int(cu_q.diff().max())
        flat = [x.transpose(1, 2).reshape(b * t, hq, d).transpose(0, 1) for x in (query, k, v)]
        out = torch.empty_like(flat[0])
        bounds = cu_q.tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            out[:, s:e] = _causal(flat[0][:, s:e], flat[1][:, s:e], flat[2][:, s:e], scale)
        return out.transpose(0, 1).reshape(b, t, hq, d), None
    rows = []
    for r in range(b):
        keep = None if attention_mask is None else attention_mask[r].bool()
        rows.append(_causal(query[r], k[r], v[r], scale, keep))
    return torch.stack(rows).transpose(1, 2), None


@pytest.fixture
def reference_flash():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(REFERENCE, varlen_reference)
    AttentionMaskInterface.register(REFERENCE, flash_attention_mask)
    CALLS.clear()
    yield CALLS


def flash_model(make_tiny_llama):
    model = make_tiny_llama(tie=True)
    model.config._attn_implementation = REFERENCE
    return model


# ---- the choice -------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl,packed,shared,packed_attention,policy,want", [
    ("sdpa", False, False, "blockwise", CPU, "blockwise"),  # the CPU: unchanged, every batch
    ("sdpa", True, True, "blockwise", CPU, "blockwise"),
    ("sdpa", False, False, "blockwise", CUDA, "padding"),  # a GPU: plain SDPA (flash / mem-efficient)
    ("sdpa", True, False, "blockwise", CUDA, "flex"),
    ("sdpa", True, True, "blockwise", CUDA, "flex"),
    ("sdpa", True, True, "mask", CUDA, "mask"),
    ("sdpa", False, False, "mask", CPU, "padding"),
    ("eager", True, False, "blockwise", CPU, "mask"),
    ("flex_attention", True, True, "blockwise", CUDA, "flex_native"),
    ("flex_attention", True, True, "blockwise", CPU, "blockwise"),  # no FlexAttention backward on the CPU
    ("flex_attention", False, False, "blockwise", CPU, "blockwise"),
    ("flash_attention_2", False, False, "blockwise", CUDA, "padding"),
    ("flash_attention_2", True, False, "blockwise", CUDA, "varlen"),
    ("flash_attention_2", True, True, "blockwise", CUDA, "flex"),
    ("flash_attention_2", True, True, "blockwise", CPU, "blockwise"),
])
def test_attention_path_is_chosen_from_layout_kernel_and_device(impl, packed, shared, packed_attention, policy,
                                                                 want):
    options = EngineOptions(packed_attention=packed_attention)
    assert attention_path(impl, packed=packed, shared=shared, options=options, policy=policy) == want


def test_attention_device_option_forces_the_gpu_choice(make_tiny_llama):
    model = make_tiny_llama()
    batch = collate_pairs(random_pairs(3), share_prompt=False, padding_free=False)
    assert attention_inputs(model, batch)["attention_mask"].dim() == 4  # CPU: the blockwise placeholder
    configure_engine(model, attention_device="cuda")
    assert attention_inputs(model, batch)["attention_mask"].dim() == 2  # GPU choice: plain SDPA
    with pytest.raises(ValueError, match="attention_device"):
        configure_engine(model, attention_device="tpu")


def test_varlen_boundaries_split_units_rows_and_padding():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1], [0, 0, 0, 0, 0, 0]])
    cu, longest = varlen_boundaries(seg)
    assert cu.tolist() == [0, 3, 5, 6, 10, 12, 18] and cu.dtype == torch.int32 and longest == 6


# ---- every path vs the naive numbers ------------------------------------------------------------------
@pytest.mark.parametrize("share_prompt,padding_free", LAYOUTS)
@pytest.mark.parametrize("path", ["blockwise", "sdpa_mask", "eager_mask", "sdpa_plain"])
def test_cpu_paths_match_naive_logps_and_grads(make_tiny_llama, share_prompt, padding_free, path):
    pairs = random_pairs(5, seed=1)
    ref = naive_reference(make_tiny_llama, pairs)
    model = make_tiny_llama(tie=True, attn="eager" if path == "eager_mask" else "sdpa")
    if path == "sdpa_mask":
        configure_engine(model, packed_attention="mask")
    if path == "sdpa_plain":  # the GPU choice, forced: unpacked rows go to torch's SDPA with a 2-D mask
        if share_prompt or padding_free:
            pytest.skip("packed rows take FlexAttention under the GPU choice (forward only on CPU)")
        configure_engine(model, attention_device="cuda")
    batch = collate_pairs(pairs, share_prompt=share_prompt, padding_free=padding_free, max_tokens_per_batch=24)
    check(model, batch, ref)


@pytest.mark.parametrize("padding_free", [True, False])
def test_flash_varlen_path_matches_naive_logps_and_grads(make_tiny_llama, reference_flash, padding_free):
    pairs = random_pairs(6, seed=2)
    ref = naive_reference(make_tiny_llama, pairs)
    model = flash_model(make_tiny_llama)
    batch = collate_pairs(pairs, share_prompt=False, padding_free=padding_free, max_tokens_per_batch=24)
    if padding_free:  # several rows of several units: the case transformers gets wrong from position_ids
        assert batch["input_ids"].shape[0] > 1 and int(batch["segment_ids"].max()) >= 1
    check(model, batch, ref)
    got = reference_flash[0]
    if padding_free:
        assert set(got) == set(VARLEN_KEYS) and isinstance(got["max_length_q"], int)
    else:
        assert got == {}  # unpacked rows: the 2-D padding mask, the kernel's unpadding


def test_flash_varlen_wrong_boundary_fails(make_tiny_llama, reference_flash, monkeypatch):
    pairs = random_pairs(6, seed=2)
    ref_c, ref_r, _ = naive_reference(make_tiny_llama, pairs, grads=False)
    model = flash_model(make_tiny_llama)
    batch = collate_pairs(pairs, share_prompt=False, padding_free=True, max_tokens_per_batch=24)

    def shifted(seg):
        cu, _ = varlen_boundaries(seg)
        cu = cu.clone()
        cu[1] += 1  # the first unit takes the next unit's first token
        return cu, int(cu.diff().max())

    monkeypatch.setattr(attention_module, "varlen_boundaries", shifted)
    with torch.no_grad():
        out = sequence_logps(model, batch)
    both = torch.cat([out.chosen_logps, out.rejected_logps])
    assert not torch.allclose(both, torch.cat([ref_c, ref_r]), atol=1e-4)


def test_flash_with_shared_prompt_falls_back_and_says_so_once(make_tiny_llama, reference_flash, caplog):
    pairs = random_pairs(5, seed=3)
    ref = naive_reference(make_tiny_llama, pairs)
    model = flash_model(make_tiny_llama)
    batch = collate_pairs(pairs, share_prompt=True, padding_free=True, max_tokens_per_batch=24)
    with caplog.at_level(logging.WARNING, logger="preftune.engine"):
        check(model, batch, ref)
        with torch.no_grad():
            sequence_logps(model, batch)
    lines = [r for r in caplog.records if "share_prompt" in r.getMessage()]
    assert len(lines) == 1 and "blockwise" in lines[0].getMessage() and REFERENCE in lines[0].getMessage()
    assert reference_flash == []  # the flash kernel never saw the shared-prompt rows


@pytest.mark.parametrize("share_prompt,padding_free", [(True, True), (False, False)])
def test_flex_attention_on_cpu_trains_in_blockwise_and_says_so(make_tiny_llama, share_prompt, padding_free, caplog):
    """``--attn_implementation flex_attention`` on the CPU ended at the first backward (FlexAttention has
    no CPU backward in torch 2.13); it now runs in the blockwise kernel, said once in the log."""
    pairs = random_pairs(4, seed=5)
    ref = naive_reference(make_tiny_llama, pairs)
    model = make_tiny_llama(tie=True, attn="flex_attention")
    batch = collate_pairs(pairs, share_prompt=share_prompt, padding_free=padding_free, max_tokens_per_batch=24)
    with caplog.at_level(logging.WARNING, logger="preftune.engine"):
        check(model, batch, ref)
    assert sum("flex_attention on the CPU" in r.getMessage() for r in caplog.records) == 1


def _flex_or_skip():
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FlexAttention")


@pytest.mark.parametrize("impl", ["sdpa", REFERENCE])
@pytest.mark.parametrize("share_prompt", [True, False])
def test_flex_path_forward_matches_naive_logps(make_tiny_llama, reference_flash, impl, share_prompt):
    """The GPU choice forced on the CPU: packed / shared-prompt rows in FlexAttention (eager on the CPU,
    forward only: its backward does not run on the CPU in torch 2.13)."""
    _flex_or_skip()
    if impl == REFERENCE and not share_prompt:
        pytest.skip("packed rows without a shared prompt take the varlen path under a flash kernel")
    pairs = random_pairs(4, seed=4)
    ref = naive_reference(make_tiny_llama, pairs, grads=False)
    model = make_tiny_llama(tie=True)
    model.config._attn_implementation = impl
    configure_engine(model, attention_device="cuda")
    batch = collate_pairs(pairs, share_prompt=share_prompt, padding_free=True, max_tokens_per_batch=30)
    layout = attention_inputs(model, batch)["attention_mask"].preftune_layout
    assert isinstance(layout, attention_module.FlexLayout)
    with torch.no_grad():
        try:
            check(model, batch, ref, grads=False)
        except (RuntimeError, NotImplementedError) as err:  # flex not runnable on this CPU build
            if "flex" not in str(err).lower():
                raise
            pytest.skip(f"FlexAttention does not run on this CPU: {err}")


# ---- fp16 in the blockwise attention --------------------------------------------------------------
@pytest.mark.parametrize("flash", [False, True])
def test_blockwise_fp16_scores_do_not_overflow(flash):
    """``Q Kᵀ`` of 100·100·16 = 160000 overflows fp16 (max 65504); scaled by 1/4 it does not."""
    batch = collate_pairs([TokenizedPair([5, 6, 7], [8, 9], [10, 11])], share_prompt=True, padding_free=False)
    seg, br, pos = batch["segment_ids"], batch["branch_ids"], batch["position_ids"]
    layout = build_block_layout(seg, br, pos, 2, flash=flash)
    torch.manual_seed(0)
    q = (100 + torch.rand(1, 2, 7, 16)).half().requires_grad_()
    k = (100 + torch.rand(1, 1, 7, 16)).half().requires_grad_()
    v = torch.randn(1, 1, 7, 16).half().requires_grad_()
    out = block_attention(q, k, v, layout)
    out.float().sum().backward()
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = block_attention(q32, k32, v32, build_block_layout(seg, br, pos, 2, flash=flash))
    want.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in (q, k, v))
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(v.grad.float(), v32.grad, atol=5e-2, rtol=5e-2)


# ---- a GPU --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("share_prompt,padding_free", LAYOUTS)
def test_gpu_paths_match_naive_logps_and_grads(make_tiny_llama, share_prompt, padding_free):
    """The default on CUDA: plain SDPA for unpacked rows, compiled FlexAttention for the others."""
    pairs = random_pairs(5, seed=1)
    ref = naive_reference(make_tiny_llama, pairs)
    model = make_tiny_llama(tie=True).cuda()
    batch = collate_pairs(pairs, share_prompt=share_prompt, padding_free=padding_free, max_tokens_per_batch=24)
    batch = {k: v.cuda() for k, v in batch.items()}
    out = sequence_logps(model, batch, chunk_size=7)
    torch.testing.assert_close(out.chosen_logps.cpu(), ref[0], atol=1e-3, rtol=0)
    torch.testing.assert_close(out.rejected_logps.cpu(), ref[1], atol=1e-3, rtol=0)
    (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
    for g_ref, p in zip(ref[2], model.parameters()):
        torch.testing.assert_close(p.grad.cpu(), g_ref, atol=1e-3, rtol=1e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_gpu_flash_attention_2_packed_rows_match_naive(make_tiny_llama):
    pytest.importorskip("flash_attn")
    pairs = random_pairs(6, seed=2)
    ref_c, ref_r, _ = naive_reference(make_tiny_llama, pairs, grads=False)
    model = make_tiny_llama(tie=True).cuda().to(torch.bfloat16)
    model.config._attn_implementation = "flash_attention_2"
    batch = collate_pairs(pairs, share_prompt=False, padding_free=True, max_tokens_per_batch=24)
    with torch.no_grad():
        out = sequence_logps(model, {k: v.cuda() for k, v in batch.items()})
    torch.testing.assert_close(out.chosen_logps.float().cpu(), ref_c, atol=0.1, rtol=0.02)
    torch.testing.assert_close(out.rejected_logps.float().cpu(), ref_r, atol=0.1, rtol=0.02)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_flash_varlen_path_on_image_pairs(family, reference_flash, tmp_path):
    """The vision kind's language model gets the same varlen boundaries (Qwen2-VL: with M-RoPE positions)."""
    import vlm_tiny as V

    from preftune.config import DataArguments
    from preftune.data.vision import tokenize_image_records
    from preftune.engine.kinds.vision import KIND as VISION
    from preftune.engine.lm_head import get_decoder_and_head

    paths = V.write_images(tmp_path, 3)
    recs = [{"prompt": "Describe the picture:", "chosen": " red squares", "rejected": " a blue sky", "images": [p]}
            for p in paths] + [{"prompt": "hi", "chosen": " hello", "rejected": " go away now"}]
    model, processor = V.tiny_vlm(family)
    pairs, _ = tokenize_image_records(recs, processor, DataArguments(max_length=512, max_prompt_length=64),
                                      source="test.jsonl")
    longest = max(len(p.prompt_ids) + len(p.chosen_ids) for p in pairs)
    batch = VISION.collate(pairs, share_prompt=False, padding_free=True, max_tokens_per_batch=2 * longest,
                           pad_token_id=0)
    assert batch["input_ids"].shape[0] > 1 and int(batch["segment_ids"].max()) >= 1
    with torch.no_grad():
        want = sequence_logps(model, batch)  # sdpa, blockwise: the naive numbers (tests/test_vision.py)
        get_decoder_and_head(model)[0].config._attn_implementation = REFERENCE
        got = sequence_logps(model, batch)
    torch.testing.assert_close(got.chosen_logps, want.chosen_logps, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.rejected_logps, want.rejected_logps, atol=1e-4, rtol=0)
    assert reference_flash and all(set(call) == set(VARLEN_KEYS) for call in reference_flash)
