"""Tests of preftune.losses.

1. Every loss / sub-variant against a naive reference written here from the papers' formulas
   (a Python loop over examples on float64 torch scalars): batch loss, gradients w.r.t. the
   input log-probs, rewards and metrics; B in (1, 3, 8); float32, float64, bfloat16.
2. Hand-computed values for cpo-sigmoid and orpo.
3. Errors of the name tables and of bad inputs; detached rewards.
4. TRL 1.16 parity at function level: TRL's own ``CPOTrainer.cpo_loss``,
   ``CPOTrainer.get_batch_loss_metrics``, ``ORPOTrainer.odds_ratio_loss``,
   ``ORPOTrainer.get_batch_loss_metrics`` and ``DPOTrainer._compute_loss`` called unbound with a
   ``SimpleNamespace`` stand-in ``self`` and a fake model that returns fixed logits.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import random_logp_batch

from preftune import losses as L
from preftune.config import LossArguments
from preftune.losses import LOSS_NAMES
from preftune.types import PolicyLogps

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")

# ---------------------------------------------------------------------------------------------
# Naive reference (independent of preftune.losses)
# ---------------------------------------------------------------------------------------------


def _logsig(x):
    # log sigmoid(x) = -log(1 + exp(-x)), fine for the moderate values used here
    return -torch.log(1 + torch.exp(-x))


def _naive(loss, loss_type, hp, c, r, lc, lr, rc=None, rr=None):
    """Batch loss, per-example rewards and metrics by a loop over examples (float64 scalars)."""
    beta, eps = hp.get("beta", 0.1), hp.get("label_smoothing", 0.0)
    n = len(c)
    total_chosen_tokens = sum(float(x) for x in lc)
    nll = -sum(c[i] for i in range(n)) / total_chosen_tokens  # token-mean over the batch
    if loss == "orpo":  # ORPO paper Eq. 2 + 6: per-sequence mean NLL, averaged over examples
        nll = -sum(c[i] / lc[i] for i in range(n)) / n
    terms, cw, rw, used_c, used_r, extra = [], [], [], [], [], defaultdict(float)
    for i in range(n):
        if loss == "cpo":
            avg = loss_type == "ipo"
            x, y = (c[i] / lc[i], r[i] / lr[i]) if avg else (c[i], r[i])
            d = x - y
            if loss_type == "sigmoid":
                t = -(1 - eps) * _logsig(beta * d) - eps * _logsig(-beta * d)
            elif loss_type == "hinge":
                t = torch.clamp(1 - beta * d, min=0)
            else:
                t = (d - 1 / (2 * beta)) ** 2
            cw.append(beta * x), rw.append(beta * y), used_c.append(x), used_r.append(y)
        elif loss in ("simpo", "cpo-simpo"):
            x, y = c[i] / lc[i], r[i] / lr[i]
            z = beta * x - beta * y - hp["simpo_gamma"]
            t = -(1 - eps) * _logsig(z) - eps * _logsig(-z)
            cw.append(beta * x), rw.append(beta * y), used_c.append(x), used_r.append(y)
        elif loss == "orpo":
            x, y = c[i] / lc[i], r[i] / lr[i]
            odds_c, odds_r = torch.exp(x) / (1 - torch.exp(x)), torch.exp(y) / (1 - torch.exp(y))
            log_odds = torch.log(odds_c / odds_r)
            ratio = _logsig(log_odds)
            t = -beta * ratio
            extra["log_odds_ratio"] += ratio.item() / n
            extra["log_odds_chosen"] += log_odds.item() / n
            cw.append(beta * x), rw.append(beta * y), used_c.append(x), used_r.append(y)
        elif loss == "dpo":
            hc, hr = c[i] - rc[i], r[i] - rr[i]
            if loss_type == "ipo":
                d = hc / lc[i] - hr / lr[i]
                t = (d - 1 / (2 * beta)) ** 2
            else:
                d = hc - hr
                if loss_type == "sigmoid":
                    t = -(1 - eps) * _logsig(beta * d) - eps * _logsig(-beta * d)
                elif loss_type == "hinge":
                    t = torch.clamp(1 - beta * d, min=0)
                else:  # robust: [(1-e) L(yw>yl) - e L(yl>yw)] / (1-2e), L = -log sigmoid
                    t = ((1 - eps) * -_logsig(beta * d) - eps * -_logsig(-beta * d)) / (1 - 2 * eps)
            cw.append(beta * hc), rw.append(beta * hr), used_c.append(c[i]), used_r.append(r[i])
        else:  # sft
            t = torch.zeros((), dtype=c.dtype)
            cw.append(c[i] / lc[i]), rw.append(r[i] / lr[i]), used_c.append(c[i]), used_r.append(r[i])
        terms.append(t)
    weight = {"cpo": hp.get("cpo_alpha", 0.0), "simpo": hp.get("cpo_alpha", 0.0),
              "cpo-simpo": hp.get("cpo_alpha", 0.0), "orpo": 1.0, "sft": 1.0,
              "dpo": hp.get("rpo_alpha") or 0.0}[loss]
    batch = sum(terms) / n + weight * nll
    metrics = {"rewards/chosen": sum(v.item() for v in cw) / n,
               "rewards/rejected": sum(v.item() for v in rw) / n,
               "rewards/accuracies": sum(c.item() > r.item() for c, r in zip(cw, rw)) / n,
               "rewards/margins": sum(c.item() - r.item() for c, r in zip(cw, rw)) / n,
               "logps/chosen": sum(v.item() for v in used_c) / n,
               "logps/rejected": sum(v.item() for v in used_r) / n,
               "nll_loss": nll.item() if weight else 0.0, **extra}
    return batch, [v.item() for v in cw], [v.item() for v in rw], metrics


CASES = [
    ("cpo", "sigmoid", {"beta": 0.1, "cpo_alpha": 1.0}),
    ("cpo", "sigmoid", {"beta": 0.3, "cpo_alpha": 0.5, "label_smoothing": 0.2}),
    ("cpo", "sigmoid", {"beta": 0.1, "cpo_alpha": 0.0}),
    ("cpo", "hinge", {"beta": 0.1, "cpo_alpha": 1.0}),
    ("cpo", "ipo", {"beta": 0.5, "cpo_alpha": 1.0}),
    ("simpo", None, {"beta": 2.0, "simpo_gamma": 0.5}),
    ("simpo", None, {"beta": 2.5, "simpo_gamma": 1.2, "label_smoothing": 0.1}),
    ("cpo-simpo", None, {"beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 1.0}),
    ("orpo", None, {"beta": 0.1}),
    ("orpo", None, {"beta": 0.7}),
    ("dpo", "sigmoid", {"beta": 0.1}),
    ("dpo", "sigmoid", {"beta": 0.1, "label_smoothing": 0.15}),
    ("dpo", "sigmoid", {"beta": 0.1, "rpo_alpha": 0.5}),
    ("dpo", "hinge", {"beta": 0.1}),
    ("dpo", "ipo", {"beta": 0.4, "rpo_alpha": 1.0}),
    ("dpo", "robust", {"beta": 0.1, "label_smoothing": 0.1}),
    ("sft", None, {}),
]


def _ids(case):
    loss, lt, hp = case
    return "-".join([loss] + ([lt] if lt else []) + [f"{k}{v}" for k, v in hp.items()])


def _random_batch(b: int, seed: int):
    return random_logp_batch(b, seed)


def _call(loss, lt, hp, c, r, lc, lr, rc, rr):
    kwargs = dict(hp)
    if lt is not None:
        kwargs["loss_type"] = lt
    return L.get_loss_fn(loss)(PolicyLogps(c, r, lc, lr, rc, rr), **kwargs)


TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("b", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_against_naive_reference(case, b, dtype):
    loss, lt, hp = case
    rtol, atol = TOL[dtype]
    base = _random_batch(b, seed=17 * b + len(_ids(case)))
    # inputs in the dtype under test; the reference sees exactly the same (rounded) values
    ours = [t.to(dtype).requires_grad_(i in (0, 1, 4, 5)) for i, t in enumerate(base)]
    ref = [t.detach().double().requires_grad_(i in (0, 1, 4, 5)) for i, t in enumerate(ours)]

    out = _call(loss, lt, hp, *ours)
    assert out.losses.shape == (b,) and out.chosen_rewards.shape == (b,) and out.rejected_rewards.shape == (b,)
    batch = out.losses.mean()
    batch.backward()
    ref_batch, ref_cw, ref_rw, ref_metrics = _naive(loss, lt, hp, *ref)
    ref_batch.backward()

    torch.testing.assert_close(batch.double(), ref_batch.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(out.chosen_rewards.double(), torch.tensor(ref_cw, dtype=torch.float64),
                               rtol=rtol, atol=atol)
    torch.testing.assert_close(out.rejected_rewards.double(), torch.tensor(ref_rw, dtype=torch.float64),
                               rtol=rtol, atol=atol)
    assert set(out.metrics) == set(ref_metrics)
    for k, v in ref_metrics.items():
        assert out.metrics[k].dim() == 0 and not out.metrics[k].requires_grad, k
        assert out.metrics[k].item() == pytest.approx(v, rel=rtol, abs=atol), k
    for i in (0, 1, 4, 5):
        g_ours, g_ref = ours[i].grad, ref[i].grad
        if g_ref is None:  # input unused by this loss (reference sums outside dpo, rejected in sft)
            assert g_ours is None or torch.count_nonzero(g_ours) == 0
            continue
        assert g_ours is not None and g_ours.dtype == dtype
        torch.testing.assert_close(g_ours.double(), g_ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_rewards_detached_and_compute_loss_dispatch(case):
    loss, lt, hp = case
    c, r, lc, lr, rc, rr = (t.float().requires_grad_(i in (0, 1, 4, 5)) for i, t in enumerate(_random_batch(3, 5)))
    direct = _call(loss, lt, hp, c, r, lc, lr, rc, rr)
    assert not direct.chosen_rewards.requires_grad and not direct.rejected_rewards.requires_grad
    assert all(not v.requires_grad for v in direct.metrics.values())
    assert direct.losses.requires_grad
    # through LossArguments / compute_loss: same numbers
    fields = {"beta": hp.get("beta"), "label_smoothing": hp.get("label_smoothing", 0.0),
              "simpo_gamma": hp.get("simpo_gamma", 0.5), "rpo_alpha": hp.get("rpo_alpha")}
    if loss in ("cpo", "simpo", "cpo-simpo"):
        fields["cpo_alpha"] = hp.get("cpo_alpha", 0.0)
    if lt is not None:
        fields[f"{loss}_loss_type"] = lt
    args = LossArguments(loss=loss, **fields)
    via = L.compute_loss(PolicyLogps(c, r, lc, lr, rc, rr), args)
    torch.testing.assert_close(via.losses, direct.losses)
    torch.testing.assert_close(via.chosen_rewards, direct.chosen_rewards)


# ---------------------------------------------------------------------------------------------
# Hand-computed examples
# ---------------------------------------------------------------------------------------------


def _one(c, r, lc, lr, dtype=torch.float64):
    t = lambda v: torch.tensor([v], dtype=dtype)  # noqa: E731
    return PolicyLogps(t(c), t(r), t(lc), t(lr))


def test_cpo_sigmoid_hand_computed():
    # chosen sum -4 over 2 tokens, rejected -6 over 3; beta 0.1: margin 2, preference term
    # -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598138869...; NLL = 4 / 2 = 2 nats per token.
    out = L.cpo_loss(_one(-4.0, -6.0, 2.0, 3.0), beta=0.1, cpo_alpha=1.0)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.2)) + 2.0, abs=1e-12)
    assert out.losses.item() == pytest.approx(2.5981388693815917, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-0.4) and out.rejected_rewards.item() == pytest.approx(-0.6)
    assert out.metrics["nll_loss"].item() == pytest.approx(2.0)
    assert out.metrics["logps/chosen"].item() == -4.0
    # label smoothing 0.25: 0.75 * log(1 + e^-0.2) + 0.25 * log(1 + e^0.2), no NLL
    out = L.cpo_loss(_one(-4.0, -6.0, 2.0, 3.0), beta=0.1, cpo_alpha=0.0, label_smoothing=0.25)
    expected = 0.75 * math.log(1 + math.exp(-0.2)) + 0.25 * math.log(1 + math.exp(0.2))
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["nll_loss"].item() == 0.0


def test_orpo_hand_computed():
    # averages: chosen -2/2 = -1, rejected -6/3 = -2. odds(p) = p / (1 - p):
    # odds_c / odds_r = [e^-1/(1-e^-1)] / [e^-2/(1-e^-2)] = (e^2 - 1)/(e - 1) = e + 1,
    # so log_odds = log(1 + e) and log sigmoid(log_odds) = log((1 + e) / (2 + e)).
    # loss = NLL (2 / 2 = 1) - beta * log((1 + e) / (2 + e)).
    out = L.orpo_loss(_one(-2.0, -6.0, 2.0, 3.0), beta=0.1)
    ratio = math.log((1 + math.e) / (2 + math.e))
    assert out.losses.item() == pytest.approx(1.0 - 0.1 * ratio, abs=1e-12)
    assert out.losses.item() == pytest.approx(1.0238183026413827, abs=1e-12)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(math.log(1 + math.e), abs=1e-12)
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(ratio, abs=1e-12)
    assert out.metrics["logps/chosen"].item() == -1.0 and out.metrics["logps/rejected"].item() == -2.0
    assert out.chosen_rewards.item() == pytest.approx(-0.1)


def test_nll_is_batch_token_mean():
    c, lc = torch.tensor([-3.0, -10.0, -1.0]), torch.tensor([1.0, 5.0, 2.0])
    nll = L.chosen_nll(c, lc)
    assert nll.mean().item() == pytest.approx(14.0 / 8.0)  # 14 nats over 8 tokens
    assert nll.tolist() == pytest.approx([3 * 3 / 8, 10 * 3 / 8, 1 * 3 / 8])


def test_orpo_nll_override():
    logps = _one(-2.0, -6.0, 2.0, 3.0)
    out = L.orpo_loss(logps, beta=0.1, nll_logps=torch.tensor([-9.0], dtype=torch.float64),
                      nll_lengths=torch.tensor([6.0], dtype=torch.float64))
    assert out.metrics["nll_loss"].item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="both nll_logps and nll_lengths"):
        L.orpo_loss(logps, nll_logps=torch.tensor([-9.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="nll_lengths must have shape"):
        L.orpo_loss(logps, nll_logps=torch.tensor([-9.0]), nll_lengths=torch.tensor([6.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_get_loss_fn_unknown_lists_names():
    with pytest.raises(ValueError) as e:
        L.get_loss_fn("ppo")
    for name in ("cpo", "simpo", "cpo-simpo", "orpo", "dpo", "sft"):
        assert name in str(e.value)
    assert tuple(L.LOSS_FUNCTIONS) == LOSS_NAMES


def test_loss_arguments_derive_from_the_table():
    for name, spec in L.TABLE.items():
        args = LossArguments(loss=name)
        assert args.spec is spec and args.needs_reference == spec.needs_reference
        assert args.is_reward_model == (spec.consumes == L.REWARDS)
        for field_name, default in spec.defaults.items():
            assert getattr(args, field_name) == default, (name, field_name)
    assert LossArguments(loss="dpo").needs_reference and LossArguments(loss="rm").is_reward_model
    assert LossArguments(loss="sft").beta is None  # sft has no temperature
    with pytest.raises(Exception, match="--dpo_loss_type 'simpo' is not valid; choose one of: sigmoid, hinge"):
        LossArguments(loss="dpo", dpo_loss_type="simpo")


def test_loss_spec_refuses_inconsistent_entries():
    with pytest.raises(ValueError, match="default of 'beta', which it does not read"):
        L.LossSpec("x", L.sft_loss, reads=("label_smoothing",), defaults={"beta": 1.0})
    with pytest.raises(ValueError, match="variants and variant_flag go together"):
        L.LossSpec("x", L.cpo_loss, reads=("beta",), variants=L.CPO_VARIANTS)
    with pytest.raises(ValueError, match="consumes 'token_logps' is not one of"):
        L.LossSpec("x", L.sft_loss, reads=(), consumes="token_logps")
    assert not L.TABLE["orpo"].takes_global_counts and L.TABLE["sft"].takes_global_counts
    assert L.TABLE["dpo"].smoothed == ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired") and L.TABLE["orpo"].smoothed == ()


def test_compute_loss_unknown_name():
    args = LossArguments(loss="cpo")
    args.loss = "nope"
    with pytest.raises(ValueError, match="unknown loss 'nope'.*cpo, simpo"):
        L.compute_loss(_one(-2.0, -6.0, 2.0, 3.0), args)


def test_errors():
    logps = _one(-2.0, -6.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="unknown cpo loss type 'robust'; valid: sigmoid, hinge, ipo"):
        L.cpo_loss(logps, loss_type="robust")
    with pytest.raises(ValueError, match="unknown dpo loss type"):
        L.dpo_loss(logps, loss_type="simpo")
    with pytest.raises(ValueError, match="needs PolicyLogps.ref_chosen_logps"):
        L.dpo_loss(logps)
    for fn, kw in ((L.cpo_loss, {"loss_type": "hinge"}), (L.cpo_loss, {"loss_type": "ipo"}), (L.orpo_loss, {}),
                   (L.sft_loss, {})):
        with pytest.raises(ValueError, match="does not use label_smoothing"):
            fn(logps, label_smoothing=0.1, **kw)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        L.simpo_loss(logps, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta must be > 0"):
        L.simpo_loss(logps, beta=0.0)
    with pytest.raises(ValueError, match="cpo_alpha must be >= 0"):
        L.cpo_loss(logps, cpo_alpha=-1.0)
    bad_shape = PolicyLogps(torch.zeros(2, 1), torch.zeros(2), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="chosen_logps must be a 1-D tensor"):
        L.cpo_loss(bad_shape)
    mismatch = PolicyLogps(torch.zeros(2), torch.zeros(3), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="rejected_logps has shape"):
        L.cpo_loss(mismatch)
    zero_len = PolicyLogps(torch.zeros(2) - 1, torch.zeros(2) - 1, torch.tensor([1.0, 0.0]), torch.ones(2))
    with pytest.raises(ValueError, match="chosen_lengths has a token count < 1"):
        L.simpo_loss(zero_len)
    ints = PolicyLogps(torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="must be floating point"):
        L.cpo_loss(ints)
    args = LossArguments(loss="dpo", cpo_alpha=0.5)
    with pytest.raises(ValueError, match="--cpo_alpha applies to"):
        L.compute_loss(logps, args)
    args = LossArguments(loss="orpo", rpo_alpha=0.5)
    with pytest.raises(ValueError, match="--rpo_alpha applies to"):
        L.compute_loss(logps, args)


# ---------------------------------------------------------------------------------------------
# TRL 1.16 parity at function level
# ---------------------------------------------------------------------------------------------

CPU = torch.device("cpu")
ACCEL = SimpleNamespace(device=CPU, gather=lambda x: x, gather_for_metrics=lambda x: x)


def _trl_cpo_self(**kw):
    from trl.experimental.cpo import CPOTrainer
    attrs = {"alpha": 0.0, "accelerator": ACCEL, "label_smoothing": 0.0, "simpo_gamma": 0.5, "cpo_alpha": 1.0,
             "aux_loss_enabled": False, "is_encoder_decoder": False, "pad_token_id": 0}
    ns = SimpleNamespace(**{**attrs, **kw})
    ns.cpo_loss = functools.partial(CPOTrainer.cpo_loss, ns)
    ns.concatenated_forward = functools.partial(CPOTrainer.concatenated_forward, ns)
    ns.concatenated_inputs = CPOTrainer.concatenated_inputs
    ns.get_batch_logps = CPOTrainer.get_batch_logps
    return CPOTrainer, ns


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0),
                                          ("simpo", 0.0), ("simpo", 0.1)])
def test_trl_cpo_loss_function(loss_type, ls):
    c, r, lc, lr, _, _ = _random_batch(8, 3)
    c, r = c.float(), r.float()
    lc, lr = lc.float(), lr.float()
    trainer, ns = _trl_cpo_self(beta=2.0 if loss_type == "simpo" else 0.3, loss_type=loss_type,
                                label_smoothing=ls, simpo_gamma=0.7)
    averaged = loss_type in ("ipo", "simpo")  # TRL feeds averaged log-probs to these
    trl_c, trl_r = (c / lc, r / lr) if averaged else (c, r)
    trl_losses, trl_cw, trl_rw = trainer.cpo_loss(ns, trl_c, trl_r)
    logps = PolicyLogps(c, r, lc, lr)
    if loss_type == "simpo":
        ours = L.simpo_loss(logps, beta=ns.beta, simpo_gamma=0.7, label_smoothing=ls, cpo_alpha=0.0)
    else:
        ours = L.cpo_loss(logps, beta=ns.beta, loss_type=loss_type, label_smoothing=ls, cpo_alpha=0.0)
    torch.testing.assert_close(ours.losses, trl_losses, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.chosen_rewards, trl_cw, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.rejected_rewards, trl_rw, rtol=0, atol=1e-6)


def _pair_batch(b: int, seed: int, vocab: int = 11):
    """Token ids, masks and per-row prompt / completion spans for B pairs, right-padded."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 5, (b,), generator=g)
    comp = torch.randint(1, 7, (2, b), generator=g)  # chosen, rejected completion lengths
    width = int((prompt + comp.max(0).values).max())
    out = {}
    for k, side in enumerate(("chosen", "rejected")):
        ids = torch.randint(1, vocab, (b, width), generator=g)
        mask = torch.zeros(b, width, dtype=torch.long)
        comp_mask = torch.zeros(b, width, dtype=torch.long)
        for i in range(b):
            end = int(prompt[i] + comp[k, i])
            mask[i, :end] = 1
            comp_mask[i, int(prompt[i]):end] = 1
        ids = ids.masked_fill(mask == 0, 0)
        out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = ids, mask
        out[f"{side}_labels"] = ids.masked_fill(comp_mask == 0, -100)
        out[f"{side}_completion_mask"] = comp_mask
    return out, width


def _token_logps(logits, ids, keep):
    """Per-token log-probs of ids[:, 1:] under logits[:, :-1], zero where keep[:, 1:] is 0."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp * keep[:, 1:]


def _ours_from_logits(logits, batch, b):
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    comp = torch.cat([batch["chosen_completion_mask"], batch["rejected_completion_mask"]])
    tok = _token_logps(logits, ids, comp)
    sums, lens = tok.sum(-1), comp[:, 1:].sum(-1).float()
    return PolicyLogps(sums[:b], sums[b:], lens[:b], lens[b:]), ids


class _FakeModel:
    """Returns fixed logits (a leaf tensor) whatever the input: the TRL code does the rest."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, *args, **kwargs):
        return SimpleNamespace(logits=self.logits)


@pytest.mark.parametrize("loss_type,alpha", [("sigmoid", 1.0), ("hinge", 0.5), ("ipo", 1.0), ("simpo", 0.0),
                                             ("simpo", 1.0), ("sigmoid", 0.0)])
def test_trl_cpo_batch_loss_metrics(loss_type, alpha):
    """Whole TRL CPO step on fixed logits: which log-probs are averaged, the NLL, the metrics."""
    b, vocab = 4, 11
    batch, width = _pair_batch(b, 7, vocab)
    torch.manual_seed(0)
    beta = 2.0 if loss_type == "simpo" else 0.2
    trainer, ns = _trl_cpo_self(beta=beta, loss_type=loss_type, cpo_alpha=alpha, simpo_gamma=0.6)
    logits_trl = torch.randn(2 * b, width, vocab, requires_grad=True)
    logits_ours = logits_trl.detach().clone().requires_grad_(True)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(ns, _FakeModel(logits_trl), batch)
    logps, _ = _ours_from_logits(logits_ours, batch, b)
    if loss_type == "simpo":
        out = L.simpo_loss(logps, beta=beta, simpo_gamma=0.6, cpo_alpha=alpha)
    else:
        out = L.cpo_loss(logps, beta=beta, loss_type=loss_type, cpo_alpha=alpha)
    ours = out.losses.mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    trl_loss.backward()
    ours.backward()
    torch.testing.assert_close(logits_ours.grad, logits_trl.grad, rtol=0, atol=1e-6)
    for k in ("logps/chosen", "logps/rejected", "nll_loss"):
        assert out.metrics[k].item() == pytest.approx(trl_metrics[k], abs=1e-6), k
    assert out.chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-6)
    assert out.rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-6)


def test_trl_orpo_odds_ratio_loss():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    c, r, lc, lr, _, _ = _random_batch(8, 11)
    c, r, lc, lr = c.float(), r.float(), lc.float(), lr.float()
    ns = SimpleNamespace(beta=0.25, accelerator=ACCEL)
    trl_losses, trl_cw, trl_rw, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(ns, c / lc, r / lr)
    out = L.orpo_loss(PolicyLogps(c, r, lc, lr), beta=0.25)
    nll = -c / lc  # preftune's ORPO NLL: per-sequence mean (paper Eq. 2); the odds-ratio term is TRL's
    torch.testing.assert_close(out.losses, nll - trl_losses, rtol=0, atol=1e-6)  # TRL: nll - beta*ratio
    torch.testing.assert_close(out.chosen_rewards, trl_cw, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, trl_rw, rtol=0, atol=1e-6)
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(trl_ratio.item(), abs=1e-6)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(trl_log_odds.item(), abs=1e-6)


def test_trl_orpo_batch_loss_metrics():
    """Whole TRL ORPO step on fixed logits. TRL's NLL covers prompt + chosen completion, which
    PolicyLogps does not carry: reproduced through orpo_loss(nll_logps=, nll_lengths=)."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    b, vocab = 5, 11
    batch, width = _pair_batch(b, 13, vocab)
    ns = SimpleNamespace(beta=0.3, accelerator=ACCEL, aux_loss_enabled=False, is_encoder_decoder=False,
                         padding_value=0)
    ns.odds_ratio_loss = functools.partial(ORPOTrainer.odds_ratio_loss, ns)
    ns.concatenated_forward = functools.partial(ORPOTrainer.concatenated_forward, ns)
    ns.concatenated_inputs = ORPOTrainer.concatenated_inputs
    ns.get_batch_logps = ORPOTrainer.get_batch_logps
    torch.manual_seed(1)
    logits_trl = torch.randn(2 * b, width, vocab, requires_grad=True)
    logits_ours = logits_trl.detach().clone().requires_grad_(True)
    trl_loss, trl_metrics = ORPOTrainer.get_batch_loss_metrics(ns, _FakeModel(logits_trl), batch)
    logps, ids = _ours_from_logits(logits_ours, batch, b)
    attn = batch["chosen_attention_mask"]
    full = _token_logps(logits_ours[:b], ids[:b], attn)  # prompt + completion, as TRL's NLL
    out = L.orpo_loss(logps, beta=0.3, nll_logps=full.sum(-1), nll_lengths=attn[:, 1:].sum(-1).float())
    ours = out.losses.mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    trl_loss.backward()
    ours.backward()
    torch.testing.assert_close(logits_ours.grad, logits_trl.grad, rtol=0, atol=1e-6)
    mine = {**out.metrics, "rewards/chosen": out.chosen_rewards.mean(), "rewards/rejected": out.rejected_rewards.mean()}
    for k in ("logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen",
              "rewards/chosen", "rewards/rejected"):
        assert mine[k].item() == pytest.approx(trl_metrics[k], abs=1e-6), k
    # the default (completion-only NLL) differs from TRL exactly by the NLL coverage
    default = L.orpo_loss(logps, beta=0.3)
    assert default.metrics["nll_loss"].item() != pytest.approx(trl_metrics["nll_loss"], abs=1e-3)


class _FakeFusedModel:
    """Stands in for a TRL fused-LM-head model: per-token label log-probs from fixed logits."""

    training = True

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, input_ids, labels, **kwargs):
        keep = (labels != -100).long()
        lp = _token_logps(self.logits, input_ids, keep)
        zeros = torch.zeros_like(lp).detach()
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


@pytest.mark.parametrize("loss_types,weights,ls,rpo", [
    (["sigmoid"], None, 0.0, None),
    (["hinge"], None, 0.0, None),
    (["ipo"], None, 0.0, None),
    (["robust"], None, 0.2, None),
    (["sigmoid", "sft"], [1.0, 0.7], 0.0, 0.7),  # RPO in TRL 1.16
    (["ipo", "sft"], [1.0, 1.0], 0.0, 1.0),
])
def test_trl_dpo_compute_loss(loss_types, weights, ls, rpo):
    from trl.trainer.dpo_trainer import DPOTrainer
    b, vocab = 4, 11
    pair, width = _pair_batch(b, 21, vocab)
    ids = torch.cat([pair["chosen_input_ids"], pair["rejected_input_ids"]])
    g = torch.Generator().manual_seed(2)
    ref_c, ref_r = -torch.rand(b, generator=g) * 10, -torch.rand(b, generator=g) * 10
    inputs = {"input_ids": ids,
              "attention_mask": torch.cat([pair["chosen_attention_mask"], pair["rejected_attention_mask"]]),
              "completion_mask": torch.cat([pair["chosen_completion_mask"], pair["rejected_completion_mask"]]),
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    torch.manual_seed(3)
    logits_trl = torch.randn(2 * b, width, vocab, requires_grad=True)
    logits_ours = logits_trl.detach().clone().requires_grad_(True)
    model = _FakeFusedModel(logits_trl)
    metrics = defaultdict(lambda: defaultdict(list))
    ns = SimpleNamespace(model=model, accelerator=ACCEL, aux_loss_enabled=False, ld_alpha=None,
                         precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types,
                         loss_weights=weights or [1.0] * len(loss_types), beta=0.15, label_smoothing=ls,
                         use_weighting=False, _metrics=metrics, _total_train_tokens=0, _tp_size=1)
    trl_loss = DPOTrainer._compute_loss(ns, model, inputs, return_outputs=False)
    logps, _ = _ours_from_logits(logits_ours, pair, b)
    logps.ref_chosen_logps, logps.ref_rejected_logps = ref_c, ref_r
    out = L.dpo_loss(logps, beta=0.15, loss_type=loss_types[0], label_smoothing=ls, rpo_alpha=rpo)
    ours = out.losses.mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    trl_loss.backward()
    ours.backward()
    torch.testing.assert_close(logits_ours.grad, logits_trl.grad, rtol=0, atol=1e-6)
    logged = metrics["train"]
    for k in ("logps/chosen", "logps/rejected"):
        assert out.metrics[k].item() == pytest.approx(logged[k][0], abs=1e-5), k
    assert out.chosen_rewards.mean().item() == pytest.approx(logged["rewards/chosen"][0], abs=1e-6)
    assert out.rejected_rewards.mean().item() == pytest.approx(logged["rewards/rejected"][0], abs=1e-6)
    margins = (out.chosen_rewards - out.rejected_rewards).mean().item()
    assert margins == pytest.approx(logged["rewards/margins"][0], abs=1e-6)
