"""The lean paths: blockwise attention, fused LoRA dropout, budget-driven checkpointing, heap trimming."""

import random

import pytest
import torch
import torch.nn.functional as F

from preftune.engine.block_attention import block_attention, build_block_layout
from preftune.engine.layout import build_attention_mask, collate_pairs
from preftune.engine.logprobs import sequence_logps
from preftune.engine.memory import (
    activation_bytes_per_token_layer,
    decoder_layers,
    malloc_trim,
    plan_checkpointing,
)
from preftune.engine.options import configure_engine, engine_options
from preftune.types import TokenizedPair

LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]


def pairs_of(lengths):
    return [TokenizedPair(list(range(3, 3 + a)), list(range(4, 4 + b)), list(range(5, 5 + c))) for a, b, c in lengths]


def dense_attention(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("share_prompt,padding_free", LAYOUTS)
@pytest.mark.parametrize("block_q", [None, 8])
@pytest.mark.parametrize("flash", [True, False], ids=["fused-cpu-kernel", "plain-pytorch"])
def test_block_attention_equals_dense_masked_attention(share_prompt, padding_free, block_q, flash):
    """Output and gradients of q, k, v equal dense SDPA under the layout's 4-D mask (float64)."""
    pairs = pairs_of([(20, 9, 14), (5, 30, 3), (40, 2, 2), (11, 11, 11)])
    batch = collate_pairs(pairs, share_prompt=share_prompt, padding_free=padding_free, max_tokens_per_batch=70)
    rows, t = batch["input_ids"].shape
    mask = build_attention_mask(batch["segment_ids"], batch["branch_ids"], packed=True)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, h, t, 8, dtype=torch.float64, generator=gen).requires_grad_() for h in (6, 2, 2))
    layout = build_block_layout(batch["segment_ids"], batch["branch_ids"], batch["position_ids"], 6, block_q=block_q,
                                flash=flash)
    out = block_attention(q, k, v, layout)
    ref = dense_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    if block_q and share_prompt:  # a rejected block skips the chosen keys (index keys, not a range)
        assert any(not isinstance(keys, slice) for blocks in layout.blocks for _, _, keys in blocks)


@pytest.mark.parametrize("flash", [True, False], ids=["fused-cpu-kernel", "plain-pytorch"])
def test_block_attention_sliding_window(flash):
    """A key is seen when pos_q - pos_k < window, in the logical positions (restarted for rejected)."""
    batch = collate_pairs(pairs_of([(12, 6, 5), (4, 3, 9)]), share_prompt=True, padding_free=True)
    rows, t = batch["input_ids"].shape
    pos = batch["position_ids"]
    mask = build_attention_mask(batch["segment_ids"], batch["branch_ids"], packed=True)
    mask = mask & ((pos[:, :, None] - pos[:, None, :]) < 4)[:, None]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(rows, 2, t, 4, dtype=torch.float64, generator=gen) for _ in range(3))
    layout = build_block_layout(batch["segment_ids"], batch["branch_ids"], pos, 2, flash=flash)
    torch.testing.assert_close(block_attention(q, k, v, layout, window=4), dense_attention(q, k, v, mask))


def _saved_square(model, batch):
    """Tensors saved for the backward whose last two dims are T x T, and the attention calls served."""
    t = batch["input_ids"].shape[1]
    found = []

    def pack(x):
        if x.dim() >= 2 and x.shape[-1] == t and x.shape[-2] == t:
            found.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = sequence_logps(model, batch)
    return found, out


def test_blockwise_keeps_no_square_tensor_and_matches_mask_path(make_tiny_llama):
    model = make_tiny_llama(attn="sdpa")
    model.train()
    configure_engine(model, max_activation_memory_gb=float("inf"))
    batch = collate_pairs(pairs_of([(30, 12, 9), (25, 10, 16)]), share_prompt=True, padding_free=True)
    square, out = _saved_square(model, batch)
    assert square == []
    (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    configure_engine(model, packed_attention="mask")
    square_mask, ref = _saved_square(model, batch)
    assert len(square_mask) == model.config.num_hidden_layers  # SDPA keeps the (float) mask in every layer
    (ref.chosen_logps.sum() - ref.rejected_logps.sum()).backward()
    torch.testing.assert_close(out.chosen_logps, ref.chosen_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.rejected_logps, ref.rejected_logps, atol=1e-5, rtol=0)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_placeholder_mask_without_layout_is_refused(make_tiny_llama):
    from preftune.engine.attention import _install_sdpa_wrapper

    model = make_tiny_llama(attn="sdpa")
    _install_sdpa_wrapper()
    fake = torch.ones((), dtype=torch.bool).expand(1, 1, 5, 5)
    with pytest.raises(RuntimeError, match="packed_attention mask"):
        model(input_ids=torch.tensor([[3, 4, 5, 6, 7]]), attention_mask=fake)
    # ordinary calls still go to transformers' SDPA
    assert model(input_ids=torch.tensor([[3, 4, 5, 6, 7]])).logits.shape == (1, 5, 96)


def test_engine_options_validation_and_config_flags():
    from preftune.config import ConfigError, EngineArguments

    with pytest.raises(ValueError, match="packed_attention"):
        configure_engine(torch.nn.Linear(2, 2), packed_attention="dense")
    with pytest.raises(ConfigError, match="packed_attention"):
        EngineArguments(packed_attention="dense")
    with pytest.raises(ConfigError, match="max_activation_memory_gb"):
        EngineArguments(max_activation_memory_gb=0)
    m = torch.nn.Linear(2, 2)
    opts = configure_engine(m, EngineArguments(packed_attention="mask", max_activation_memory_gb=float("inf")))
    assert engine_options(m) is opts and opts.packed_attention == "mask" and opts.max_activation_memory_gb == float("inf")


# ---- LoRA dropout ---------------------------------------------------------------------------------
def _lora_model(make_tiny_llama, dropout):
    from preftune.config import PeftArguments
    from preftune.models.peft import apply_peft

    model = make_tiny_llama()
    return apply_peft(model, PeftArguments(use_peft=True, lora_dropout=dropout, lora_r=4))


@pytest.fixture(params=["host", "device"])
def mask_source(request, monkeypatch):
    """Both sources of LoRA dropout masks: numpy on the host (CPU tensors) and a torch generator on the
    tensor's device (GPU tensors; forced here on the CPU through the device policy)."""
    from preftune.device import DevicePolicy

    if request.param == "device":
        monkeypatch.setattr(DevicePolicy, "host_dropout_masks", staticmethod(lambda tensor: False))
    return request.param


def test_fused_lora_dropout_equals_explicit_mask_and_keeps_only_x(mask_source):
    from preftune.models.lora_dropout import DropoutLinear, _mask

    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 5, bias=False)
    layer.__class__ = DropoutLinear
    layer.dropout_p = 0.3
    x = torch.randn(2, 7, 12, requires_grad=True)
    saved = []
    torch.manual_seed(123)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    torch.manual_seed(123)
    mask = _mask(x, 0.3, int(torch.randint(0, 2 ** 62, ())))
    q = round(0.7 * 65536) / 65536  # the realised keep-probability (16-bit draws)
    torch.testing.assert_close(mask.unique(), torch.tensor([0.0, 1 / q]))
    ref = F.linear(x * mask, layer.weight)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (x, layer.weight))
    want = torch.autograd.grad((ref * g).sum(), (x, layer.weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), layer.weight.data_ptr()]
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))


def test_fused_lora_dropout_rate_and_independent_masks(mask_source):
    from preftune.models.lora_dropout import _mask

    x = torch.ones(400, 1000)  # 4e5 draws: the standard error of a rate near 0.05 is 3.4e-4
    a, b = _mask(x, 0.05, 1), _mask(x, 0.05, 2)
    assert abs(float((a == 0).float().mean()) - 0.05) < 0.0015
    assert abs(float(a.mean()) - 1.0) < 0.002
    assert abs(float((_mask(x, 0.5, 3) == 0).float().mean()) - 0.5) < 0.005
    assert not torch.equal(a, b) and torch.equal(a, _mask(x, 0.05, 1))
    # independent across seeds and neighbouring elements: correlations at noise level (~1.6e-3)
    da, db = (a == 0).float().flatten(), (b == 0).float().flatten()
    assert abs(float(torch.corrcoef(torch.stack([da, db]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([da[:-1], da[1:]]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([da[:-1000], da[1000:]]))[0, 1])) < 0.01
    # any shape and dtype: odd sizes (not a multiple of four draws), bfloat16
    odd = _mask(torch.ones(3, 7, dtype=torch.bfloat16), 0.3, 4)
    assert odd.shape == (3, 7) and odd.dtype == torch.bfloat16


def test_apply_peft_fuses_dropout_state_dict_unchanged(make_tiny_llama):
    from preftune.models.lora_dropout import DropoutLinear

    model = _lora_model(make_tiny_llama, 0.1)
    plain = _lora_model(make_tiny_llama, 0.0)
    assert model._preftune_fused_lora_dropout == 7 * 2  # 7 adapted linears per layer, 2 layers
    fused = [m for m in model.modules() if isinstance(m, DropoutLinear)]
    assert len(fused) == 14 and all(m.dropout_p == 0.1 for m in fused)
    assert sorted(model.state_dict()) == sorted(plain.state_dict())
    assert plain._preftune_fused_lora_dropout == 0  # dropout 0: nothing to fuse
    model.eval()
    plain.load_state_dict(model.state_dict())
    plain.eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_lora_dropout_saves_no_more_than_dropout_zero(make_tiny_llama):
    """With the fused path, --lora_dropout 0.05 keeps as many bytes for the backward as dropout 0."""
    batch = collate_pairs(pairs_of([(20, 8, 8), (12, 9, 5)]))

    def saved_bytes(model):
        model.train()
        seen = {}

        def pack(x):
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            sequence_logps(model, batch)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(n for ptr, n in seen.items() if ptr not in params)

    with_dropout, without = saved_bytes(_lora_model(make_tiny_llama, 0.05)), saved_bytes(_lora_model(make_tiny_llama, 0.0))
    assert with_dropout == without


def test_dropout_mask_same_under_checkpointing(make_tiny_llama):
    """A checkpointed layer recomputes the same dropout masks: same gradients as without checkpointing."""
    batch = collate_pairs(pairs_of([(10, 6, 7), (8, 5, 4)]))

    def grads(budget):
        model = _lora_model(make_tiny_llama, 0.2)
        model.train()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        configure_engine(model, max_activation_memory_gb=budget)
        torch.manual_seed(7)
        out = sequence_logps(model, batch)
        (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
        ks = model._preftune_checkpointed_layers
        return ks, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    k0, g0 = grads(float("inf"))
    k1, g1 = grads(1e-9)
    assert (k0, k1) == (0, 2)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5)


# ---- budget and estimate -----------------------------------------------------------------------------
def test_activation_estimate_matches_saved_bytes(make_tiny_llama):
    """The per-token, per-layer estimate is within 25% of the bytes saved-tensor hooks count."""
    model = _lora_model(make_tiny_llama, 0.05)
    model.train()
    configure_engine(model, max_activation_memory_gb=float("inf"))
    rng = random.Random(0)
    batch = collate_pairs(pairs_of([(rng.randint(20, 40), rng.randint(10, 30), rng.randint(10, 30)) for _ in range(4)]))
    stack, per_layer = [], {}
    layers = decoder_layers(model)
    assert len(layers) == 2
    hooks = [m.register_forward_pre_hook(lambda m, a, i=i: stack.append(i)) for i, m in enumerate(layers)]
    hooks += [m.register_forward_hook(lambda m, a, o: (stack.pop(), None)[1]) for m in layers]
    seen = set()

    def pack(x):
        ptr = x.untyped_storage().data_ptr()
        if stack and ptr not in seen:
            seen.add(ptr)
            per_layer[stack[-1]] = per_layer.get(stack[-1], 0) + x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sequence_logps(model, batch)
    for h in hooks:
        h.remove()
    tokens = batch["input_ids"].numel()
    measured = per_layer[1] / tokens  # layer 1: its input is layer 0's output (saved by layer 0's residual)
    estimate = activation_bytes_per_token_layer(model)
    assert 0.75 * estimate <= measured <= 1.25 * estimate, (measured, estimate)


def test_plan_checkpointing_budget_and_user_override(make_tiny_llama):
    model = make_tiny_llama(layers=4)
    model.train()
    per = activation_bytes_per_token_layer(model)
    tokens = 1000
    assert plan_checkpointing(model, tokens, float("inf")) == 0
    assert plan_checkpointing(model, tokens, 4 * tokens * per / 2 ** 30) == 0
    k = plan_checkpointing(model, tokens, 2.5 * tokens * per / 2 ** 30)
    assert k == 2  # 4 layers need 4 units; each checkpointed layer frees a bit less than 1
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [True, True, False, False]
    assert plan_checkpointing(model, tokens, 1e-9) == 4
    other = make_tiny_llama(layers=3)
    other.train()
    other.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert plan_checkpointing(other, tokens, float("inf")) == 3  # --activation_checkpointing: every layer, always


def test_malloc_trim_runs():
    import sys

    assert malloc_trim() is sys.platform.startswith("linux")


# ---- speed paths (opt-in) ----------------------------------------------------------------------------
def _grads_of(model, batch, seed=7, **options):
    configure_engine(model, max_activation_memory_gb=float("inf"), **options)
    model.zero_grad()
    torch.manual_seed(seed)
    out = sequence_logps(model, batch)
    (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lm_head_and_fused_lora_equal_default_path(make_tiny_llama, tie, dropout):
    from preftune.config import PeftArguments
    from preftune.models.peft import apply_peft

    model = apply_peft(make_tiny_llama(tie=tie), PeftArguments(use_peft=True, lora_dropout=dropout, lora_r=4))
    model.train()
    for name, p in model.named_parameters():  # B = 0 at init would hide errors in the LoRA path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(len(name)))
    batch = collate_pairs(pairs_of([(10, 6, 7), (8, 5, 4), (3, 9, 2)]))
    ref, g_ref = _grads_of(model, batch)
    assert len(g_ref) == 2 * 7 * 2  # A and B of 7 adapters in 2 layers: the head is frozen
    for opts in ({"fused_lm_head": True}, {"fused_lora": True}, {"fused_lm_head": True, "fused_lora": True}):
        out, g = _grads_of(model, batch, fused_lm_head=opts.get("fused_lm_head", False),
                           fused_lora=opts.get("fused_lora", False))
        torch.testing.assert_close(out.chosen_logps, ref.chosen_logps, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.rejected_logps, ref.rejected_logps, atol=1e-5, rtol=0)
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-4)
    from peft.tuners.lora.layer import Linear as LoraLinear

    lora = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert all("forward" in vars(m) for m in lora)  # fused_lora installed ...
    _grads_of(model, batch, fused_lora=False)
    assert not any("forward" in vars(m) for m in lora)  # ... and removed again


def test_fused_lm_head_token_logps_and_fallback():
    from preftune.engine.lm_head import fused_head_applies, token_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50).requires_grad_(False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    w = torch.randn(37)
    ref = token_logps(head, hidden, targets, chunk_size=8)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), hidden)
    got = token_logps(head, hidden, targets, chunk_size=8, fused=True)
    (g,) = torch.autograd.grad((got * w).sum(), hidden)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g, g_ref)
    head.weight.requires_grad_(True)  # a trainable head needs its own gradient: the checkpointed path
    assert not fused_head_applies(head, hidden)


@pytest.mark.skipif(not __import__("os").environ.get("PREFTUNE_TEST_COMPILE"),
                    reason="CPU inductor compilation takes minutes; set PREFTUNE_TEST_COMPILE=1")
def test_compile_layers_equal_eager(make_tiny_llama):
    from preftune.config import PeftArguments
    from preftune.models.peft import apply_peft

    model = apply_peft(make_tiny_llama(layers=1), PeftArguments(use_peft=True, lora_dropout=0.1, lora_r=4))
    model.train()
    batch = collate_pairs(pairs_of([(10, 6, 7), (8, 5, 4)]))
    ref, g_ref = _grads_of(model, batch)
    out, g = _grads_of(model, batch, compile_layers=True)
    assert model._preftune_compiled
    torch.testing.assert_close(out.chosen_logps, ref.chosen_logps, atol=1e-5, rtol=0)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-4)


def test_malloc_trim_hooks_follow_the_option(make_tiny_llama, monkeypatch):
    import preftune.engine.memory as mem

    calls = []
    monkeypatch.setattr(mem, "malloc_trim", lambda: calls.append(1) or True)
    model = make_tiny_llama()
    model.train()
    batch = collate_pairs(pairs_of([(6, 4, 3)]))
    configure_engine(model, max_activation_memory_gb=float("inf"), malloc_trim=True, malloc_trim_threshold_mb=0)
    out = sequence_logps(model, batch)
    n_fwd = len(calls)
    assert n_fwd == 2  # one per decoder layer's forward
    out.chosen_logps.sum().backward()
    assert len(calls) == 4  # and one before each layer's backward
    configure_engine(model, malloc_trim=False)
    sequence_logps(model, batch).chosen_logps.sum().backward()
    assert len(calls) == 4


def test_malloc_trim_threshold_trims_only_after_growth(monkeypatch):
    """--malloc_trim_threshold_mb: a trim only when the resident-but-unused memory grew past it."""
    import preftune.engine.memory as mem

    unused = [100 * 2 ** 20]
    trims = []

    def fake_trim():
        trims.append(unused[0])
        unused[0] = 100 * 2 ** 20  # a trim gives the grown part back
        return True

    monkeypatch.setattr(mem, "malloc_trim", fake_trim)
    monkeypatch.setattr(mem, "resident_unused_bytes", lambda: unused[0])
    monkeypatch.setattr(mem, "_UNUSED_AFTER_TRIM", None)
    assert mem.malloc_trim_if_grown(64)  # no trim yet: the first call trims and sets the baseline
    for grown_mb, want in [(10, False), (60, False), (70, True), (30, False), (65, True)]:
        unused[0] = 100 * 2 ** 20 + grown_mb * 2 ** 20
        assert mem.malloc_trim_if_grown(64) is want, grown_mb
    assert len(trims) == 3
    unused[0] = 500 * 2 ** 20
    assert mem.malloc_trim_if_grown(0)  # 0: every call trims
    assert len(trims) == 4


def test_malloc_trim_threshold_reaches_the_layer_hooks(make_tiny_llama, monkeypatch):
    import preftune.engine.memory as mem

    seen = []
    monkeypatch.setattr(mem, "malloc_trim_if_grown", lambda t: seen.append(t) or True)
    model = make_tiny_llama()
    model.train()
    batch = collate_pairs(pairs_of([(6, 4, 3)]))
    configure_engine(model, max_activation_memory_gb=float("inf"), malloc_trim=True, malloc_trim_threshold_mb=256)
    sequence_logps(model, batch).chosen_logps.sum().backward()
    assert seen == [256.0] * 4  # two layers: forward and backward each
    with pytest.raises(ValueError, match="malloc_trim_threshold_mb"):
        configure_engine(model, malloc_trim_threshold_mb=-1)
