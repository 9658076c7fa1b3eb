"""LD-DPO (``ld_alpha``), WPO (``use_weighting``) and TR-DPO (``sync_ref_model``) (issue 23).

1. The engine's extra per-sequence outputs (preftune.engine.lm_head via the model kind's ``score``)
   against a naive full-logits computation, in every layout, with the checkpointed and the fused LM head.
2. TRL 1.16's ``DPOTrainer`` with ``ld_alpha`` / ``use_weighting`` on its first batch (tiny Llama, the
   SmolLM2 tokenizer, a differently seeded reference): loss, logged metrics and parameter gradients in the
   four layouts (<= 1e-5), the reference live and precomputed.
3. TR-DPO through ``PreferenceTrainer``: after k syncs the reference equals TRL's
   ``SyncRefModelCallback`` rule applied to the policy's states at the sync steps — a reference model,
   a LoRA reference adapter, and precomputed reference log-probs recomputed at each sync.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import trl_helpers as H
from conftest import random_pairs, tiny_llama
from transformers import TrainerCallback, TrainingArguments

from preftune.config import EngineArguments, LossArguments
from preftune.engine.forward import (
    configure_for_loss,
    configure_sequence_outputs,
    prepare_forward,
    set_reference_table,
)
from preftune.engine.layout import collate_pairs
from preftune.engine.logprobs import sequence_logps
from preftune.engine.options import configure_engine
from preftune.engine.reference import compute_reference_logps
from preftune.errors import ConfigError
from preftune.losses import dpo_loss
from preftune.trainer import PreferenceTrainer

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")

# ---------------------------------------------------------------------------------------------
# 1. The engine's outputs against full logits
# ---------------------------------------------------------------------------------------------


def _naive(model, pairs, ld_alpha):
    """Per pair and side: (LD sum, plain sum, sum of log p_t - log sum_v p_v^2) from full logits."""
    out = []
    for p in pairs:
        shared = min(len(p.chosen_ids), len(p.rejected_ids))
        sides = []
        for comp in (p.chosen_ids, p.rejected_ids):
            logits = model(torch.tensor([p.prompt_ids + comp])).logits[0].float()
            logp = torch.log_softmax(logits, -1)[len(p.prompt_ids) - 1:-1]
            tok = logp.gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)
            weight = torch.ones_like(tok)
            weight[shared:] = ld_alpha
            sides.append(((tok * weight).sum(), tok.sum(), (tok - torch.logsumexp(2 * logp, -1)).sum().detach()))
        out.append(sides)
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["checkpointed", "fused"])
def test_engine_ld_and_aligned_sums_every_layout(fused):
    model = tiny_llama(seed=3)
    model.lm_head.requires_grad_(False)  # the fused head needs a frozen head (as under LoRA)
    configure_engine(model, fused_lm_head=fused)
    pairs = random_pairs(4, seed=5)
    assert len({len(p.chosen_ids) for p in pairs} | {len(p.rejected_ids) for p in pairs}) > 2
    configure_sequence_outputs(model, ld_alpha=0.3, aligned_logps=True)
    naive = _naive(model, pairs, 0.3)
    weights = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    sum(weights[i, s] * naive[i][s][0] for i in range(4) for s in range(2)).backward()
    expected_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for share_prompt, padding_free in H.LAYOUTS:
        batch = collate_pairs(pairs, share_prompt=share_prompt, padding_free=padding_free, max_tokens_per_batch=60)
        model.zero_grad()
        out = sequence_logps(model, batch, chunk_size=7)
        assert out.ld_alpha == 0.3
        for i in range(4):
            for s, (ld, aligned) in enumerate(((out.chosen_logps, out.chosen_aligned_logps),
                                                (out.rejected_logps, out.rejected_aligned_logps))):
                assert ld[i].item() == pytest.approx(naive[i][s][0].item(), abs=1e-5)
                assert aligned[i].item() == pytest.approx(naive[i][s][2].item(), abs=1e-5)
            assert out.chosen_plain_logps[i].item() == pytest.approx(naive[i][0][1].item(), abs=1e-5)
        assert not out.chosen_aligned_logps.requires_grad
        (weights[:, 0] * out.chosen_logps + weights[:, 1] * out.rejected_logps).sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_plain_engine_outputs_unchanged_and_loss_checks_ld():
    model = tiny_llama(seed=1)
    pairs = random_pairs(3, seed=2)
    batch = collate_pairs(pairs, share_prompt=True, padding_free=True)
    with torch.no_grad():
        plain = sequence_logps(model, batch)
        configure_sequence_outputs(model, ld_alpha=1.0)
        same = sequence_logps(model, batch)
    assert plain.ld_alpha is None and plain.chosen_plain_logps is None and plain.chosen_aligned_logps is None
    torch.testing.assert_close(same.chosen_logps, plain.chosen_logps, rtol=0, atol=1e-6)  # alpha 1: plain sums
    plain.ref_chosen_logps, plain.ref_rejected_logps = plain.chosen_logps - 1, plain.rejected_logps
    with pytest.raises(ValueError, match="summed with ld_alpha=None"):
        dpo_loss(plain, ld_alpha=0.5)
    with pytest.raises(ValueError, match="needs PolicyLogps.chosen_aligned_logps"):
        dpo_loss(plain, use_weighting=True)


# ---------------------------------------------------------------------------------------------
# 2. TRL 1.16 parity (DPOTrainer with ld_alpha / use_weighting)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(request):
    cache = getattr(request.config, "cache", None)
    return H.load_tokenizer(cache.mkdir("preftune-smollm2-tokenizer") if cache is not None else None)


TRL_CASES = {
    # case: (DPOConfig kwargs, LossArguments kwargs); under LD-DPO the sft term is the plain chosen NLL and
    # ipo's token counts the plain ones
    "ld-ipo+sft": (dict(loss_type=["ipo", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.3, beta=0.5),
                   dict(loss="dpo", dpo_loss_type=["ipo", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.3, beta=0.5)),
    # (TRL 1.16 fails on hinge with use_weighting: an in-place product on relu's output)
    "wpo-ld-sigmoid+bco": (dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.7, 0.3], use_weighting=True,
                                ld_alpha=0.5, beta=0.1),
                           dict(loss="dpo", dpo_loss_type=["sigmoid", "bco_pair"], loss_weights=[0.7, 0.3],
                                use_weighting=True, ld_alpha=0.5)),
}


def _trl_first_step(tokenizer, policy, ref, tmp_path, **kwargs):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**H.trl_common_args(tmp_path), max_length=1024, precompute_ref_log_probs=False, **kwargs)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=H.dataset(), processing_class=tokenizer)
    batch = H.first_batch(trainer)
    trainer.model.zero_grad(set_to_none=True)
    loss, metrics = H.trl_step(trainer, batch)
    loss.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.model.parameters()]
    return batch, loss.detach(), metrics, grads


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_matches_trl_dpo_trainer_every_layout(case, tokenizer, tmp_path):
    trl_kwargs, loss_kwargs = TRL_CASES[case]
    base, other = H.tiny_llama(tokenizer, seed=0), H.tiny_llama(tokenizer, seed=1)
    batch, trl_loss, trl_metrics, trl_grads = _trl_first_step(tokenizer, H.clone(base), H.clone(other), tmp_path,
                                                              **trl_kwargs)
    assert trl_metrics["rewards/margins"] != 0.0
    pairs = H.pairs_from_dpo_batch(batch)
    shared = [min(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    assert any(len(p.chosen_ids) != len(p.rejected_ids) for p in pairs) and min(shared) > 0
    loss_args = LossArguments(**loss_kwargs)
    ours, ours_ref = H.clone(base), H.clone(other)
    configure_for_loss(loss_args, ours, ours_ref)
    scale = max(g.abs().max().item() for g in trl_grads)
    # the precomputed reference once per kind of sum (its reference forward is the live one's)
    for reference in ("live", "precomputed") if case == "ld-ipo+sft" else ("live",):
        if reference == "precomputed":  # the configured reference model gives LD-DPO's sums
            ref_c, ref_r = compute_reference_logps(ours_ref, pairs, batch_size=3, chunk_size=20)
            for p, c, r in zip(pairs, ref_c.tolist(), ref_r.tolist()):
                p.ref_chosen_logps, p.ref_rejected_logps = c, r
        for share_prompt, padding_free in H.LAYOUTS:
            where = f"{case} {reference} share_prompt={share_prompt} padding_free={padding_free}"
            ours.zero_grad(set_to_none=True)
            loss, metrics = H.preftune_step(ours, pairs, loss_args, share_prompt=share_prompt,
                                            padding_free=padding_free, ref_model=ours_ref)
            assert abs(loss.item() - trl_loss.item()) <= 1e-5, (where, loss.item(), trl_loss.item())
            for k in H.COMPARED:
                assert abs(metrics[k] - trl_metrics[k]) <= 1e-5, (where, k, metrics[k], trl_metrics[k])
            loss.backward()
            worst = max((a.grad if a.grad is not None else torch.zeros_like(a)).sub(b).abs().max().item()
                        for a, b in zip(ours.parameters(), trl_grads))
            assert worst <= 1e-5 * scale, (where, worst, scale)


# ---------------------------------------------------------------------------------------------
# 3. TR-DPO through PreferenceTrainer
# ---------------------------------------------------------------------------------------------

ALPHA, STEPS, MAX_STEPS = 0.4, 2, 5  # syncs after steps 2 and 4


class _Snapshots(TrainerCallback):
    """The policy's state at the end of every step, before the trainer's own callbacks (registered first)."""

    def __init__(self):
        self.states = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        snapshot = copy.deepcopy(model)
        if "reference" in (getattr(snapshot, "peft_config", None) or {}):  # the policy: its training adapter
            snapshot.delete_adapter("reference")
        self.states[state.global_step] = snapshot


def _train(tmp_path, model, pairs, *, ref_model=None, reference_context=None, precompute=False):
    loss_args = LossArguments(loss="dpo", sync_ref_model=True, ref_model_mixup_alpha=ALPHA,
                              ref_model_sync_steps=STEPS)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=MAX_STEPS,
                             per_device_train_batch_size=2, learning_rate=5e-2, save_strategy="no",
                             logging_steps=100, seed=0, lr_scheduler_type="constant")
    snapshots = _Snapshots()
    trainer = PreferenceTrainer(model=model, args=args, loss_args=loss_args, train_dataset=pairs,
                                engine_args=EngineArguments(precompute_ref_log_probs=precompute),
                                ref_model=ref_model, reference_context=reference_context, callbacks=[snapshots])
    trainer.train()
    assert trainer.ref_sync.syncs == MAX_STEPS // STEPS
    return trainer, snapshots.states


def _trl_rule(initial_ref, states):
    """TRL 1.16's SyncRefModelCallback over the same policy states: the expected reference."""
    from trl.trainer.callbacks import SyncRefModelCallback

    expected = copy.deepcopy(initial_ref)
    for step in sorted(states):
        if step % STEPS == 0:
            SyncRefModelCallback._sync_target_model(states[step], expected, ALPHA)
    return expected


def test_trdpo_reference_model_follows_trl_rule(tmp_path):
    model, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    expected_start = copy.deepcopy(ref)
    trainer, states = _train(tmp_path, model, random_pairs(10, seed=1), ref_model=ref)
    expected = _trl_rule(expected_start, states)
    changed = False
    for got, want, start in zip(ref.parameters(), expected.parameters(), expected_start.parameters(), strict=True):
        assert torch.equal(got, want)
        changed |= not torch.equal(got, start)
    assert changed


@pytest.mark.parametrize("precompute", [False, True], ids=["live", "precomputed"])
def test_trdpo_lora_reference_adapter_follows_trl_rule(tmp_path, precompute):
    from peft import LoraConfig, get_peft_model

    from preftune.models.peft import reference_context

    model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          lora_dropout=0.0, task_type="CAUSAL_LM"))
    initial = copy.deepcopy(model)  # TRL's rule on a copy of the initial PeftModel (mixing its parameters)
    pairs = random_pairs(10, seed=2)
    context = functools.partial(reference_context, model)
    if precompute:  # a fresh adapter's reference: adapters off
        ref_c, ref_r = compute_reference_logps(model, pairs, reference_context=context, batch_size=4)
        for p, c, r in zip(pairs, ref_c.tolist(), ref_r.tolist()):
            p.ref_chosen_logps, p.ref_rejected_logps = c, r
    trainer, states = _train(tmp_path, model, pairs, reference_context=context, precompute=precompute)
    expected = _trl_rule(initial, states)
    if precompute:  # recomputed with the updated reference adapter
        want_c, _ = compute_reference_logps(expected, pairs, batch_size=4)
        torch.testing.assert_close(torch.tensor([p.ref_chosen_logps for p in pairs], dtype=torch.float64), want_c,
                                   rtol=0, atol=1e-5)
    ours = dict(model.named_parameters())
    n = 0
    for name, want in expected.named_parameters():
        if ".default." in name:
            torch.testing.assert_close(ours[name.replace(".default.", ".reference.")], want, rtol=0, atol=0)
            n += 1
    assert n > 0 and not any(p.requires_grad for k, p in ours.items() if ".reference." in k)
    batch = collate_pairs(pairs, share_prompt=True, padding_free=True)
    model.eval()
    with torch.no_grad(), reference_context(model):
        got = sequence_logps(model, batch)
    with torch.no_grad():
        want = sequence_logps(expected.eval(), batch)
        policy = sequence_logps(model, batch)
    torch.testing.assert_close(got.chosen_logps, want.chosen_logps, rtol=0, atol=1e-5)
    assert not torch.allclose(policy.chosen_logps, got.chosen_logps, atol=1e-3)  # the reference lags the policy


def test_trdpo_precomputed_reference_recomputed_at_each_sync(tmp_path):
    model = tiny_llama(seed=0)
    initial = copy.deepcopy(model)
    pairs = random_pairs(10, seed=3)
    ref_c, ref_r = compute_reference_logps(model, pairs, batch_size=4)
    for p, c, r in zip(pairs, ref_c.tolist(), ref_r.tolist()):
        p.ref_chosen_logps, p.ref_rejected_logps = c, r
    trainer, states = _train(tmp_path, model, pairs, precompute=True)
    expected = _trl_rule(initial, states)
    want_c, want_r = compute_reference_logps(expected, pairs, batch_size=4)
    got_c = torch.tensor([p.ref_chosen_logps for p in pairs], dtype=torch.float64)
    got_r = torch.tensor([p.ref_rejected_logps for p in pairs], dtype=torch.float64)
    torch.testing.assert_close(got_c, want_c, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_r, want_r, rtol=0, atol=1e-5)
    assert (got_c - ref_c).abs().max() > 1e-3  # the reference moved


def test_stale_batch_takes_the_reference_table_in_training():
    model = tiny_llama(seed=0)
    pairs = random_pairs(3, seed=4)
    for i, p in enumerate(pairs):
        p.ref_chosen_logps, p.ref_rejected_logps, p.record_index = -1.0, -2.0, i
    batch = collate_pairs(pairs)
    set_reference_table(model, torch.tensor([10.0, 11.0, 12.0]), torch.tensor([20.0, 21.0, 22.0]))
    model.eval()
    prepare_forward(model, batch)
    assert batch["ref_chosen_logps"].tolist() == [-1.0] * 3  # evaluation pairs are updated on the pairs
    model.train()
    prepare_forward(model, batch)
    assert batch["ref_chosen_logps"].tolist() == [10.0, 11.0, 12.0]
    assert batch["ref_rejected_logps"].tolist() == [20.0, 21.0, 22.0]


def test_trdpo_needs_something_to_update(tmp_path):
    model = tiny_llama(seed=0)
    with pytest.raises(ConfigError, match="needs a reference to update"):
        _train(tmp_path, model, random_pairs(4, seed=1))


# ---------------------------------------------------------------------------------------------
# Doors
# ---------------------------------------------------------------------------------------------


def test_cli_flags_and_trl_config():
    from preftune.cli_args import parse_groups
    from preftune.trl import DPOConfig

    a = parse_groups(["--loss", "dpo", "--ld_alpha", "0.3", "--use_weighting", "--sync_ref_model",
                      "--ref_model_mixup_alpha", "0.5", "--ref_model_sync_steps", "8", "--output_dir", "unused"]).loss
    assert (a.ld_alpha, a.use_weighting, a.sync_ref_model, a.ref_model_mixup_alpha, a.ref_model_sync_steps) == (
        0.3, True, True, 0.5, 8)
    a = DPOConfig(output_dir="unused", report_to="none", ld_alpha=0.2, use_weighting=True, sync_ref_model=True,
                  ref_model_sync_steps=3).preftune_groups()[3]
    assert (a.ld_alpha, a.use_weighting, a.sync_ref_model, a.ref_model_mixup_alpha, a.ref_model_sync_steps) == (
        0.2, True, True, 0.6, 3)


@pytest.mark.parametrize("kw,match", [
    (dict(loss="cpo", ld_alpha=0.5), "--ld_alpha applies to --loss dpo only"),
    (dict(loss="dpo", ld_alpha=1.5), "--ld_alpha must be in"),
    (dict(loss="dpo", use_weighting=True, dpo_loss_type="aot_unpaired"), "does not apply to --dpo_loss_type aot"),
    (dict(loss="dpo", use_weighting=True, rpo_alpha=0.5), "not the NLL term"),
    (dict(loss="orpo", sync_ref_model=True), "applies to the losses with a reference policy"),
    (dict(loss="dpo", ref_model_sync_steps=4), "apply with --sync_ref_model"),
    (dict(loss="dpo", sync_ref_model=True, ref_model_mixup_alpha=1.5), "--ref_model_mixup_alpha must be in"),
    (dict(loss="dpo", sync_ref_model=True, ref_model_sync_steps=0), "--ref_model_sync_steps must be"),
])
def test_wrong_combinations_are_one_line(kw, match):
    with pytest.raises(ConfigError, match=match) as err:
        LossArguments(**kw)
    assert "\n" not in str(err.value)


def test_cli_precomputed_and_live_reference_agree(tiny_model_dir, tmp_path, monkeypatch):
    """``preftune train`` with LD-DPO, WPO and TR-DPO over LoRA: the reference precomputed (LD sums from the
    start, recomputed at each sync) and live (the reference adapter) give one trajectory."""
    import json

    from preftune.cli import main
    from preftune.data.loading import demo_path

    monkeypatch.setenv("PREFTUNE_REF_CACHE", str(tmp_path / "ref-cache"))
    losses = {}
    for name, flag in (("pre", "true"), ("live", "false")):
        out = tmp_path / name
        assert main(["train", "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--use_peft",
                     "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "3", "--per_device_train_batch_size", "4",
                     "--logging_steps", "1", "--learning_rate", "5e-2", "--max_length", "128", "--max_prompt_length", "64", "--seed", "3",
                     "--dataset", demo_path() + "#16",
                     "--save_strategy", "no", "--dataloader_num_workers", "0", "--loss", "dpo", "--ld_alpha", "0.5",
                     "--use_weighting", "--sync_ref_model", "--ref_model_sync_steps", "2", "--ref_model_mixup_alpha",
                     "0.5", "--precompute_ref_log_probs", flag]) == 0
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        losses[name] = [h["loss"] for h in history if "loss" in h]
    assert len(losses["pre"]) == 3  # step 3 against the reference updated after step 2
    assert losses["pre"] == pytest.approx(losses["live"], abs=1e-5)
    results = {}  # preftune evaluate with LD-DPO / WPO: the engine set up there too
    for name, extra in (("ld", ["--ld_alpha", "0.5", "--use_weighting"]), ("plain", [])):
        path = tmp_path / f"{name}.json"
        assert main(["evaluate", "--model", tiny_model_dir, "--adapter", str(tmp_path / "pre"), "--loss", "dpo",
                     "--dataset", demo_path() + "#16", "--max_length", "128", "--max_prompt_length", "64",
                     "--output_json", str(path), *extra]) == 0
        results[name] = json.loads(path.read_text())
    assert results["ld"]["num_pairs"] == 16
    assert results["ld"]["logps/chosen"] > results["plain"]["logps/chosen"]  # the tail weighs 0.5
