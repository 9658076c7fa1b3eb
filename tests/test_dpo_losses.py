"""Tests of the DPO family's loss types, mixtures, f-DPO and AlphaPO (preftune.losses.dpo / dpo_terms, cpo).

1. Every DPO ``loss_type``, the f-divergences, mixtures and AlphaPO against a naive reference written
   here from the papers' formulas (a loop over examples on float64 scalars): batch loss, gradients
   w.r.t. the input log-probs, rewards and metrics; B in (3, 8); float32 and float64.
2. TRL 1.16 parity on the same per-sequence inputs: ``DPOTrainer._compute_loss`` called unbound with
   a stand-in ``self`` and a fake model whose per-token log-probs are a leaf tensor (loss, rewards,
   metrics and gradients, <= 1e-5), and the experimental ``CPOTrainer.cpo_loss`` for AlphaPO.
3. The doors: LossArguments / CLI lists, DPOConfig, CPOConfig, ms-swift's ``--loss_type``; errors.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import random_logp_batch

from preftune import losses as L
from preftune.config import LossArguments
from preftune.errors import ConfigError
from preftune.types import PolicyLogps

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")

# ---------------------------------------------------------------------------------------------
# Naive reference (independent of preftune.losses)
# ---------------------------------------------------------------------------------------------


def _logsig(x):
    return -(torch.log1p(torch.exp(-abs(x))) + torch.clamp(-x, min=0))


def _sig(x):
    return torch.exp(_logsig(x))


def _score(h, div, coef):
    u = torch.exp(h)
    if div == "forward_kl":
        return 1 - 1 / u
    if div == "js_divergence":
        return torch.log(2 * u / (1 + u))
    if div == "alpha_divergence" and abs(coef - 1) > 1e-6:
        return (u ** (coef - 1) - 1) / (coef - 1)
    return h


def _naive_term(t, i, x, hp):
    """Term ``t`` of example ``i``; x: dict of per-example lists (c, r, rc, rr, lc, lr)."""
    b, e, tau = hp["beta"], hp.get("label_smoothing", 0.0), hp.get("discopop_tau", 0.05)
    hc, hr = x["c"][i] - x["rc"][i], x["r"][i] - x["rr"][i]
    div, coef = hp.get("f_divergence_type", "reverse_kl"), hp.get("f_alpha_divergence_coef", 0.5)
    sc, sr = _score(hc, div, coef), _score(hr, div, coef)
    d = sc - sr
    if t == "sigmoid":
        return -(1 - e) * _logsig(b * d) - e * _logsig(-b * d)
    if t == "hinge":
        return torch.clamp(1 - b * d, min=0)
    if t == "ipo":
        return (sc / x["lc"][i] - sr / x["lr"][i] - 1 / (2 * b)) ** 2
    if t == "robust":
        return ((1 - e) * -_logsig(b * d) - e * -_logsig(-b * d)) / (1 - 2 * e)
    if t == "exo_pair":  # KL(p || (1-e, e)), p = (sig(bd), 1 - sig(bd))
        p = _sig(b * d)
        return p * torch.log(p / (1 - e)) + (1 - p) * torch.log((1 - p) / e)
    if t == "nca_pair":
        return -_logsig(b * hc) - 0.5 * _logsig(-b * hc) - 0.5 * _logsig(-b * hr)
    if t == "bco_pair":
        return -_logsig(b * hc) - _logsig(-b * hr)
    if t == "sppo_hard":
        return (hc - 1 / (2 * b)) ** 2 + (hr + 1 / (2 * b)) ** 2
    if t == "apo_zero":
        return 1 - _sig(b * hc) + _sig(b * hr)
    if t == "apo_down":
        return _sig(b * hc) + 1 - _sig(b * (hc - hr))
    if t == "discopop":
        z = b * d
        w = _sig(z / tau)
        return (1 - w) * -_logsig(z) + w * torch.exp(-z)
    if t == "sigmoid_norm":
        return -_logsig(b * (sc / x["lc"][i] - sr / x["lr"][i]))
    raise AssertionError(t)


def _naive_aot(t, x, hp):
    """Mean of AOT's terms over the order statistics."""
    b, e, n = hp["beta"], hp.get("label_smoothing", 0.0), len(x["c"])
    key = lambda v: v.item()  # noqa: E731
    if t == "aot":
        a = sorted([x["c"][i] - x["r"][i] for i in range(n)], key=key)
        z = sorted([x["rc"][i] - x["rr"][i] for i in range(n)], key=key)
    else:
        a = sorted([x["c"][i] - x["rc"][i] for i in range(n)], key=key)
        z = sorted([x["r"][i] - x["rr"][i] for i in range(n)], key=key)
    return sum(-(1 - e) * _logsig(b * (a[k] - z[k])) - e * _logsig(-b * (a[k] - z[k])) for k in range(n)) / n


def naive_dpo(types, weights, hp, c, r, lc, lr, rc, rr):
    """Batch loss ``sum_k w_k mean_i term_k,i (+ rpo_alpha nll)``, rewards and metrics (float64 scalars)."""
    n = len(c)
    x = {"c": list(c), "r": list(r), "lc": list(lc), "lr": list(lr), "rc": list(rc), "rr": list(rr)}
    nll = -sum(x["c"]) / sum(float(v) for v in lc)
    batch = 0.0
    for t, w in zip(types, weights or [1.0] * len(types)):
        if t == "sft":
            mean = nll
        elif t in ("aot", "aot_unpaired"):
            mean = _naive_aot(t, x, hp)
        else:
            mean = sum(_naive_term(t, i, x, hp) for i in range(n)) / n
        batch = batch + w * mean
    rpo = hp.get("rpo_alpha") or 0.0
    batch = batch + rpo * nll
    beta = hp["beta"]
    cw = [beta * (x["c"][i] - x["rc"][i]).item() for i in range(n)]
    rw = [beta * (x["r"][i] - x["rr"][i]).item() for i in range(n)]
    metrics = {"rewards/chosen": sum(cw) / n, "rewards/rejected": sum(rw) / n,
               "rewards/accuracies": sum(a > b for a, b in zip(cw, rw)) / n,
               "rewards/margins": sum(a - b for a, b in zip(cw, rw)) / n,
               "logps/chosen": sum(v.item() for v in x["c"]) / n, "logps/rejected": sum(v.item() for v in x["r"]) / n,
               "nll_loss": nll.item() if ("sft" in types or rpo) else 0.0}
    return batch, cw, rw, metrics


def naive_alphapo(loss_type, hp, c, r, lc, lr):
    """TRL's experimental CPO with ``alpha``: r = (1 - p^-a) / a of the used log-probs (averaged for ipo /
    simpo), the variant's term, rewards beta * r, plus cpo_alpha x the batch token-mean NLL."""
    n, b, a, e = len(c), hp["beta"], hp["alpha"], hp.get("label_smoothing", 0.0)
    avg = loss_type in ("ipo", "simpo")
    terms, cw, rw, uc, ur = [], [], [], [], []
    for i in range(n):
        x, y = (c[i] / lc[i], r[i] / lr[i]) if avg else (c[i], r[i])
        rx, ry = (1 - torch.exp(x) ** -a) / a, (1 - torch.exp(y) ** -a) / a
        d = rx - ry
        if loss_type == "simpo":
            d = d - hp["simpo_gamma"] / b
        if loss_type in ("sigmoid", "simpo"):
            t = -(1 - e) * _logsig(b * d) - e * _logsig(-b * d)
        elif loss_type == "hinge":
            t = torch.clamp(1 - b * d, min=0)
        else:
            t = (d - 1 / (2 * b)) ** 2
        terms.append(t), cw.append(b * rx.item()), rw.append(b * ry.item()), uc.append(x.item()), ur.append(y.item())
    nll = -sum(c[i] for i in range(n)) / sum(float(v) for v in lc)
    w = hp.get("cpo_alpha", 0.0)
    batch = sum(terms) / n + w * nll
    metrics = {"rewards/chosen": sum(cw) / n, "rewards/rejected": sum(rw) / n,
               "rewards/accuracies": sum(p > q for p, q in zip(cw, rw)) / n,
               "rewards/margins": sum(p - q for p, q in zip(cw, rw)) / n,
               "logps/chosen": sum(uc) / n, "logps/rejected": sum(ur) / n, "nll_loss": nll.item() if w else 0.0}
    return batch, cw, rw, metrics


def _batch(b: int, seed: int):
    return random_logp_batch(b, seed, max_len=30, spread=1.5, noise=1.5)


ALL_TYPES = list(L.DPO_VARIANTS)
SMOOTHING = {"exo_pair": 0.1, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}
DIVERGENCES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 1.7)]
MIXTURES = [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),  # MPO (TRL docs, ms-swift)
    (["apo_zero", "nca_pair", "sppo_hard", "aot_unpaired"], [0.5, 1.5, 0.25, 1.0], {}),
    (["exo_pair", "ipo", "discopop", "sft"], [1.0, 2.0, 0.5, 0.3], {"label_smoothing": 0.05}),
]

# (types, weights, hyper-parameters) of every case of the naive-reference and TRL tests
DPO_CASES = (
    [([t], None, {"beta": 0.1, "label_smoothing": SMOOTHING.get(t, 0.0)}) for t in ALL_TYPES]
    + [(["discopop"], None, {"beta": 0.3, "discopop_tau": 0.2}), (["sppo_hard"], None, {"beta": 0.7}),
       (["aot"], None, {"beta": 0.2})]
    + [([t], None, {"beta": 0.1, "f_divergence_type": div, "f_alpha_divergence_coef": coef,
                    "label_smoothing": SMOOTHING.get(t, 0.0)})
       for div, coef in DIVERGENCES for t in ("sigmoid", "ipo", "hinge", "exo_pair", "discopop", "sigmoid_norm")]
    + [(types, weights, {"beta": 0.1, **hp}) for types, weights, hp in MIXTURES]
    + [(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {"beta": 0.1, "f_divergence_type": "reverse_kl"}),
       (["robust", "sigmoid_norm", "sft"], None, {"beta": 0.1, "label_smoothing": 0.1,
                                                  "f_divergence_type": "js_divergence"})]
)


def _cid(case):
    types, weights, hp = case
    return "+".join(types) + (f"-w{weights}" if weights else "") + "".join(f"-{k}{v}" for k, v in hp.items())


def _dpo(types, weights, hp, logps):
    return L.dpo_loss(logps, loss_type=types if len(types) > 1 else types[0], loss_weights=weights, **hp)


@pytest.mark.parametrize("case", DPO_CASES, ids=[_cid(c) for c in DPO_CASES])
@pytest.mark.parametrize("b", [3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dpo_against_naive_reference(case, b, dtype):
    types, weights, hp = case
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)
    base = _batch(b, seed=31 * b + len(_cid(case)))
    ours = [t.to(dtype).requires_grad_(i in (0, 1)) for i, t in enumerate(base)]
    ref = [t.detach().double().requires_grad_(i in (0, 1)) for i, t in enumerate(ours)]
    out = _dpo(types, weights, hp, PolicyLogps(*ours))
    assert out.losses.shape == (b,) and out.chosen_rewards.shape == (b,)
    out.losses.mean().backward()
    ref_batch, ref_cw, ref_rw, ref_metrics = naive_dpo(types, weights, hp, *ref)
    ref_batch.backward()
    torch.testing.assert_close(out.losses.mean().double(), ref_batch.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(out.chosen_rewards.double(), torch.tensor(ref_cw, dtype=torch.float64),
                               rtol=rtol, atol=atol)
    torch.testing.assert_close(out.rejected_rewards.double(), torch.tensor(ref_rw, dtype=torch.float64),
                               rtol=rtol, atol=atol)
    assert set(out.metrics) == set(ref_metrics)
    for k, v in ref_metrics.items():
        assert out.metrics[k].dim() == 0 and not out.metrics[k].requires_grad, k
        assert out.metrics[k].item() == pytest.approx(v, rel=rtol, abs=atol), k
    for i in (0, 1):
        if ref[i].grad is None:  # the rejected completions with sft alone
            assert ours[i].grad is None or torch.count_nonzero(ours[i].grad) == 0
            continue
        assert ours[i].grad is not None and ours[i].grad.dtype == dtype
        torch.testing.assert_close(ours[i].grad.double(), ref[i].grad, rtol=rtol, atol=atol)


ALPHAPO_CASES = [("sigmoid", {"beta": 0.1, "alpha": 0.25, "cpo_alpha": 1.0}),
                 ("sigmoid", {"beta": 0.1, "alpha": -0.5, "cpo_alpha": 0.0, "label_smoothing": 0.1}),
                 ("hinge", {"beta": 0.1, "alpha": 0.1, "cpo_alpha": 0.0}),
                 ("ipo", {"beta": 0.5, "alpha": 0.5, "cpo_alpha": 1.0}),
                 ("simpo", {"beta": 2.0, "alpha": 0.25, "simpo_gamma": 0.5}),  # TRL's loss_type="alphapo"
                 ("simpo", {"beta": 2.5, "alpha": -0.3, "simpo_gamma": 1.0, "cpo_alpha": 1.0})]


def _alphapo(loss_type, hp, logps):
    if loss_type == "simpo":
        return L.simpo_loss(logps, cpo_alpha=hp.get("cpo_alpha", 0.0), **{k: v for k, v in hp.items()
                                                                         if k != "cpo_alpha"})
    return L.cpo_loss(logps, loss_type=loss_type, **hp)


def _small_sums(b, seed):
    # AlphaPO raises p = exp(logps) to -alpha: keep the summed log-probs moderate (short completions)
    c, r, lc, lr, _, _ = _batch(b, seed)
    return c / lc * 3, r / lr * 3, torch.full_like(lc, 3.0) + (lc % 3), torch.full_like(lr, 3.0) + (lr % 3)


@pytest.mark.parametrize("case", ALPHAPO_CASES, ids=[f"{t}-{hp}" for t, hp in ALPHAPO_CASES])
@pytest.mark.parametrize("b", [3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_alphapo_against_naive_reference(case, b, dtype):
    loss_type, hp = case
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)
    base = _small_sums(b, seed=7 * b)
    ours = [t.to(dtype).requires_grad_(i in (0, 1)) for i, t in enumerate(base)]
    ref = [t.detach().double().requires_grad_(i in (0, 1)) for i, t in enumerate(ours)]
    out = _alphapo(loss_type, hp, PolicyLogps(*ours))
    out.losses.mean().backward()
    ref_batch, ref_cw, ref_rw, ref_metrics = naive_alphapo(loss_type, hp, *ref)
    ref_batch.backward()
    torch.testing.assert_close(out.losses.mean().double(), ref_batch.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(out.chosen_rewards.double(), torch.tensor(ref_cw, dtype=torch.float64),
                               rtol=rtol, atol=atol)
    for k, v in ref_metrics.items():
        assert out.metrics[k].item() == pytest.approx(v, rel=rtol, abs=atol), k
    for i in (0, 1):
        torch.testing.assert_close(ours[i].grad.double(), ref[i].grad, rtol=rtol, atol=atol)


def test_alpha_zero_and_reverse_kl_are_the_plain_losses():
    c, r, lc, lr, rc, rr = _batch(5, 3)
    logps = PolicyLogps(c, r, lc, lr, rc, rr)
    for fn, kw in ((L.cpo_loss, {}), (L.simpo_loss, {}), (L.cpo_loss, {"loss_type": "ipo"})):
        assert torch.equal(fn(logps, alpha=0.0, **kw).losses, fn(logps, **kw).losses)
    plain = L.dpo_loss(logps, loss_type="ipo")
    for div in ("reverse_kl", "alpha_divergence"):
        same = L.dpo_loss(logps, loss_type=["ipo"], loss_weights=[1.0], f_divergence_type=div,
                          f_alpha_divergence_coef=1.0)
        assert torch.equal(same.losses, plain.losses)
    rpo = L.dpo_loss(logps, loss_type="sigmoid", rpo_alpha=0.7)
    mix = L.dpo_loss(logps, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7])
    torch.testing.assert_close(mix.losses, rpo.losses, rtol=1e-14, atol=1e-14)
    assert mix.metrics["nll_loss"] == rpo.metrics["nll_loss"]


# ---------------------------------------------------------------------------------------------
# TRL 1.16 parity
# ---------------------------------------------------------------------------------------------

CPU = torch.device("cpu")
ACCEL = SimpleNamespace(device=CPU, gather=lambda x: x, gather_for_metrics=lambda x: x)
COMPARED = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected")


class _TokenLogpsModel:
    """Stands in for TRL's fused-LM-head model: returns fixed per-token log-probs (a leaf tensor)."""

    training = True

    def __init__(self, token_logps):
        self.token_logps = token_logps

    def __call__(self, input_ids, labels, **kwargs):
        keep = (labels[:, 1:] != -100).to(self.token_logps.dtype)
        lp = self.token_logps * keep
        zeros = torch.zeros_like(lp).detach()
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _token_batch(b, dtype, seed):
    """Per-token log-probs ``(2B, T)`` of chosen then rejected completions, the completion mask
    ``(2B, T + 1)`` (position 0 is the prompt) and reference sums ``(B,)``."""
    g = torch.Generator().manual_seed(seed)
    width = 9
    lengths = torch.randint(1, width + 1, (2 * b,), generator=g)
    mask = torch.zeros(2 * b, width + 1, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        mask[i, 1:1 + n] = 1
    token_logps = -(0.05 + 1.2 * torch.rand(2 * b, width, generator=g, dtype=torch.float64))
    sums = (token_logps * mask[:, 1:]).sum(1)
    ref = sums + torch.randn(2 * b, generator=g, dtype=torch.float64) * 1.5
    return token_logps.to(dtype), mask, ref[:b].to(dtype), ref[b:].to(dtype)


def _trl_dpo(types, weights, hp, token_logps, mask, ref_c, ref_r):
    from trl.trainer.dpo_trainer import DPOTrainer

    model = _TokenLogpsModel(token_logps)
    metrics = defaultdict(lambda: defaultdict(list))
    ns = SimpleNamespace(
        model=model, accelerator=ACCEL, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type=hp.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=hp.get("f_alpha_divergence_coef", 0.5), loss_types=types,
        loss_weights=weights or [1.0] * len(types), beta=hp["beta"], label_smoothing=hp.get("label_smoothing", 0.0),
        use_weighting=False, _metrics=metrics, _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(discopop_tau=hp.get("discopop_tau", 0.05)))
    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(ns, model, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in metrics["train"].items()}


def _trl_comparable(case):
    types, _, hp = case
    # TRL 1.16 ignores label smoothing for sigmoid (preftune: conservative DPO)
    return not ("sigmoid" in types and hp.get("label_smoothing", 0.0))


TRL_CASES = [c for c in DPO_CASES if _trl_comparable(c)]


@pytest.mark.parametrize("case", TRL_CASES, ids=[_cid(c) for c in TRL_CASES])
@pytest.mark.parametrize("b", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dpo_matches_trl(case, b, dtype):
    types, weights, hp = case
    if dtype == torch.float64 and hp.get("f_divergence_type") == "alpha_divergence":
        pytest.skip("TRL 1.16's alpha_divergence has no float64 clamp bound (KeyError)")
    token_logps, mask, ref_c, ref_r = _token_batch(b, dtype, seed=11 * b + len(_cid(case)))
    trl_leaf = token_logps.clone().requires_grad_(True)
    our_leaf = token_logps.clone().requires_grad_(True)
    trl_loss, logged = _trl_dpo(types, weights, hp, trl_leaf, mask, ref_c, ref_r)
    m = mask[:, 1:].to(dtype)
    sums, lengths = (our_leaf * m).sum(1), m.sum(1)
    logps = PolicyLogps(sums[:b], sums[b:], lengths[:b], lengths[b:], ref_c, ref_r)
    out = _dpo(types, weights, hp, logps)
    ours = out.losses.mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-6)
    trl_loss.backward()
    ours.backward()
    torch.testing.assert_close(our_leaf.grad, trl_leaf.grad, rtol=1e-6, atol=1e-5)
    for k in COMPARED:
        assert out.metrics[k].item() == pytest.approx(logged[k], abs=1e-5, rel=1e-6), k


def _trl_cpo_loss(loss_type, hp, chosen, rejected):
    from trl.experimental.cpo import CPOTrainer

    ns = SimpleNamespace(alpha=hp["alpha"], accelerator=ACCEL, label_smoothing=hp.get("label_smoothing", 0.0),
                         simpo_gamma=hp.get("simpo_gamma", 0.5), beta=hp["beta"], loss_type=loss_type)
    return CPOTrainer.cpo_loss(ns, chosen, rejected)


@pytest.mark.parametrize("case", ALPHAPO_CASES, ids=[f"{t}-{hp}" for t, hp in ALPHAPO_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_alphapo_matches_trl(case, dtype):
    """TRL's CPOTrainer.cpo_loss on the log-probs it uses (per-token averages for ipo / simpo) plus its
    ``cpo_alpha * nll`` (the batch token mean), against preftune on the sums and token counts."""
    loss_type, hp = case
    c, r, lc, lr = (t.to(dtype) for t in _small_sums(6, seed=5))
    c_trl, r_trl = c.clone().requires_grad_(True), r.clone().requires_grad_(True)
    c_ours, r_ours = c.clone().requires_grad_(True), r.clone().requires_grad_(True)
    avg = loss_type in ("ipo", "simpo")
    used_c, used_r = (c_trl / lc, r_trl / lr) if avg else (c_trl, r_trl)
    losses, cw, rw = _trl_cpo_loss(loss_type, hp, used_c, used_r)
    trl_loss = losses.mean() + hp.get("cpo_alpha", 0.0) * (-c_trl.sum() / lc.sum())
    out = _alphapo(loss_type, hp, PolicyLogps(c_ours, r_ours, lc, lr))
    ours = out.losses.mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-6)
    torch.testing.assert_close(out.chosen_rewards, cw, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.rejected_rewards, rw, rtol=1e-6, atol=1e-5)
    assert out.metrics["rewards/accuracies"].item() == (cw > rw).to(dtype).mean().item()
    assert out.metrics["logps/chosen"].item() == pytest.approx(used_c.mean().item(), abs=1e-6)
    trl_loss.backward()
    ours.backward()
    torch.testing.assert_close(c_ours.grad, c_trl.grad, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(r_ours.grad, r_trl.grad, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Doors and errors
# ---------------------------------------------------------------------------------------------


def test_compute_loss_dispatches_mixtures_and_options():
    c, r, lc, lr, rc, rr = _batch(4, 9)
    logps = PolicyLogps(c, r, lc, lr, rc, rr)
    args = LossArguments(loss="dpo", dpo_loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    direct = L.dpo_loss(logps, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    torch.testing.assert_close(L.compute_loss(logps, args).losses, direct.losses)
    args = LossArguments(loss="dpo", dpo_loss_type="discopop", discopop_tau=0.3, f_divergence_type="forward_kl")
    direct = L.dpo_loss(logps, loss_type="discopop", discopop_tau=0.3, f_divergence_type="forward_kl")
    torch.testing.assert_close(L.compute_loss(logps, args).losses, direct.losses)
    args = LossArguments(loss="simpo", alpha=0.2)
    torch.testing.assert_close(L.compute_loss(logps, args).losses, L.simpo_loss(logps, alpha=0.2).losses)
    assert LossArguments(loss="dpo", dpo_loss_type=["ipo"]).dpo_loss_type == "ipo"  # one name stays a string
    assert L.TABLE["dpo"].smoothed == ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")


@pytest.mark.parametrize("kw,match", [
    (dict(loss="dpo", dpo_loss_type="exo_pair"), "exo_pair needs --label_smoothing > 0"),
    (dict(loss="dpo", dpo_loss_type=["bco_pair"], f_divergence_type="js_divergence"),
     "--f_divergence_type js_divergence has no form for --dpo_loss_type bco_pair"),
    (dict(loss="dpo", f_divergence_type="chi2"), "--f_divergence_type 'chi2' is not valid"),
    (dict(loss="dpo", dpo_loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "--loss_weights has 1 entries"),
    (dict(loss="dpo", dpo_loss_type=["sigmoid", "nope"]), "--dpo_loss_type 'nope' is not valid"),
    (dict(loss="dpo", dpo_loss_type=["sigmoid", "sft"], rpo_alpha=0.5), "give the NLL weight once"),
    (dict(loss="dpo", dpo_loss_type="discopop", discopop_tau=0.0), "--discopop_tau must be > 0"),
    (dict(loss="dpo", dpo_loss_type="bco_pair", label_smoothing=0.1), "does not use label_smoothing"),
    (dict(loss="cpo", f_divergence_type="forward_kl"), "--f_divergence_type applies to --loss dpo only"),
    (dict(loss="orpo", alpha=0.5), "--alpha applies to --loss cpo/simpo/cpo-simpo only"),
    (dict(loss="cpo", loss_weights=[1.0]), "--loss_weights applies to --loss dpo only"),
    (dict(loss="cpo", dpo_loss_type=["sigmoid", "sft"]), "applies to --loss dpo only"),
    (dict(loss="simpo", alpha=math.inf), "--alpha must be a finite number"),
])
def test_wrong_combinations_are_one_line(kw, match):
    if "label_smoothing" in kw and kw.get("dpo_loss_type") == "bco_pair":  # a loss-time check, as for hinge
        args = LossArguments(**kw)
        with pytest.raises(ValueError, match=match):
            L.compute_loss(PolicyLogps(*_batch(2, 1)), args)
        return
    with pytest.raises(ConfigError, match=match) as err:
        LossArguments(**kw)
    assert "\n" not in str(err.value)


def test_loss_function_errors():
    logps = PolicyLogps(*_batch(3, 2))
    with pytest.raises(ValueError, match="unknown dpo loss type 'simpo'"):
        L.dpo_loss(logps, loss_type="simpo")
    with pytest.raises(ValueError, match="exo_pair needs --label_smoothing"):
        L.dpo_loss(logps, loss_type=["exo_pair"])
    with pytest.raises(ValueError, match="has no form for --dpo_loss_type aot"):
        L.dpo_loss(logps, loss_type="aot", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="finite"):
        L.dpo_loss(logps, loss_type=["sigmoid"], loss_weights=[math.nan])


def test_cli_lists_and_swift_loss_type():
    from preftune.cli_args import parse_groups

    def loss(*argv):
        return parse_groups([*argv, "--output_dir", "unused"]).loss

    a = loss("--loss", "dpo", "--dpo_loss_type", "sigmoid", "bco_pair", "sft", "--loss_weights", "0.8", "0.2", "1.0")
    assert (a.dpo_loss_type, a.loss_weights) == (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    a = loss("--loss", "dpo", "--f_divergence_type", "alpha_divergence", "--f_alpha_divergence_coef", "0.3")
    assert (a.dpo_loss_type, a.f_divergence_type, a.f_alpha_divergence_coef) == ("sigmoid", "alpha_divergence", 0.3)
    assert loss("--loss", "simpo", "--alpha", "0.25").alpha == 0.25
    a = loss("--rlhf_type", "dpo", "--model", "m", "--loss_type", "sigmoid", "bco_pair", "sft",
             "--loss_weights", "0.8", "0.2", "1.0")
    assert (a.loss, a.dpo_loss_type, a.loss_weights) == ("dpo", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    assert loss("--rlhf_type", "cpo", "--model", "m", "--loss_type", "hinge").cpo_loss_type == "hinge"
    assert (loss("--loss_type", "ipo").loss, loss("--loss_type", "ipo").dpo_loss_type) == ("dpo", "ipo")
    with pytest.raises(ConfigError, match="--loss_type sigmoid does not apply to --loss orpo"):
        loss("--rlhf_type", "orpo", "--model", "m", "--loss_type", "sigmoid")


def test_trl_configs():
    from preftune.trl import CPOConfig, DPOConfig

    kw = dict(output_dir="unused", report_to="none")

    def loss(cfg):
        return cfg.preftune_groups()[3]

    a = loss(DPOConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], **kw))
    assert (a.loss, a.dpo_loss_type, a.loss_weights, a.rpo_alpha) == (
        "dpo", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], None)
    a = loss(DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[0.5, 1.0], **kw))  # a mixture now, not RPO
    assert (a.dpo_loss_type, a.loss_weights, a.rpo_alpha) == (["sigmoid", "sft"], [0.5, 1.0], None)
    a = loss(DPOConfig(loss_type=["robust", "sft"], loss_weights=[1.0, 0.25], label_smoothing=0.1, **kw))
    assert (a.dpo_loss_type, a.rpo_alpha) == ("robust", 0.25)  # RPO as before
    a = loss(DPOConfig(loss_type="discopop", discopop_tau=0.1, f_divergence_type="js_divergence", **kw))
    assert (a.dpo_loss_type, a.discopop_tau, a.f_divergence_type) == ("discopop", 0.1, "js_divergence")
    a = loss(CPOConfig(loss_type="alphapo", alpha=0.25, **kw))
    assert (a.loss, a.alpha, a.cpo_alpha) == ("simpo", 0.25, 0.0)
    for bad, match in ((dict(loss_type="exo_pair"), "loss_type exo_pair needs label_smoothing > 0"),
                       (dict(loss_type="bco_pair", f_divergence_type="forward_kl"), "no form for loss_type bco_pair"),
                       (dict(loss_type=["nope"]), "not supported"),
                       (dict(use_weighting=True, loss_type="aot"), "use_weighting"), (dict(ld_alpha=1.5), "ld_alpha"),
                       (dict(sync_ref_model=True, loss_type="sft"), "sync_ref_model")):
        with pytest.raises(ConfigError, match=match):
            DPOConfig(**bad, **kw)
