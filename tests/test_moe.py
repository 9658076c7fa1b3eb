"""Mixture-of-experts router load-balancing loss (engine/kinds/moe.py) on tiny random Mixtral and
Qwen2-MoE models: every layout gives the naive (model's own, unshared [P C] / [P R]) auxiliary loss,
and TRL 1.16's CPOTrainer / DPOTrainer MoE path gives the same loss and aux_loss."""

from __future__ import annotations

import pytest
import torch
import trl_helpers as H

from preftune.config import ConfigError, EngineArguments, LossArguments
from preftune.engine.kinds.moe import load_balancing_loss, router_aux_coef, token_weights
from preftune.engine.logprobs import sequence_logps
from preftune.trainer import PreferenceTrainer
from preftune.types import TokenizedPair

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")

TOL = 1e-5


def tiny_moe(kind: str, vocab_size: int = 96, seed: int = 0, output_router_logits: bool = True, **extra):
    """A tiny random MoE causal LM: Mixtral (4 experts, top-2) or Qwen2-MoE (4 experts, top-2, a
    shared expert, one dense layer among three)."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, output_router_logits=output_router_logits,
                  attn_implementation="sdpa", attention_dropout=0.0, initializer_range=0.2, pad_token_id=0,
                  tie_word_embeddings=False)
    common.update(extra)
    if kind == "mixtral":
        config = MixtralConfig(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                               router_aux_loss_coef=0.02, **common)
        return MixtralForCausalLM(config).float().eval()
    config = Qwen2MoeConfig(num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                            shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1],
                            router_aux_loss_coef=0.05, **common)
    return Qwen2MoeForCausalLM(config).float().eval()


def random_pairs(n: int = 5, vocab: int = 96, seed: int = 1) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    return [TokenizedPair(ids(3 + 2 * i), ids(2 + (i * 3) % 5), ids(1 + (i * 2) % 6)) for i in range(n)]


def naive_aux(model, pairs) -> torch.Tensor:
    """The model's own ``aux_loss`` over right-padded rows [P C] (all chosen) then [P R] (TRL's batch)."""
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_every_layout_gives_the_naive_aux_loss_and_gradients(kind):
    model = tiny_moe(kind)
    pairs = random_pairs()
    model.zero_grad()
    naive = naive_aux(model, pairs)
    naive.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any("gate" in n for n in ref_grads), "the router receives no gradient"
    seen = []
    for share_prompt, padding_free in H.LAYOUTS:
        model.zero_grad()
        batch = H.layout(pairs, share_prompt=share_prompt, padding_free=padding_free)
        out = sequence_logps(model, batch, chunk_size=7)
        aux = out.extra_losses["aux_loss"]
        assert out.extra_loss_weights == {"aux_loss": router_aux_coef(model)}  # the trainer adds weight * term
        assert abs(float(aux) - float(naive)) <= 1e-6, (share_prompt, padding_free, float(aux), float(naive))
        aux.backward()
        for name, grad in ref_grads.items():
            got = dict(model.named_parameters())[name].grad
            assert torch.allclose(got, grad, atol=1e-6, rtol=1e-5), (share_prompt, padding_free, name)
        seen.append(float(aux))
    assert max(seen) - min(seen) <= 1e-6


def test_shared_prompt_tokens_count_twice_and_padding_never():
    pairs = random_pairs(3)
    shared = H.layout(pairs, share_prompt=True, padding_free=False)
    w = token_weights(shared).reshape(shared["segment_ids"].shape)
    for b, p in enumerate(pairs):  # row b holds [P C R] of pair b, then padding
        lp, lc, lr = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        assert w[b, :lp].tolist() == [2.0] * lp
        assert w[b, lp:lp + lc + lr].tolist() == [1.0] * (lc + lr)
        assert w[b, lp + lc + lr:].sum() == 0
    plain = H.layout(pairs, share_prompt=False, padding_free=False)
    # both layouts weigh the same number of (token, occurrence) slots: the [P C] + [P R] tokens
    assert token_weights(plain).sum() == token_weights(shared).sum() == sum(p.num_tokens_logical for p in pairs)


def test_weighted_formula_is_transformers_with_a_mask():
    """With 0/1 weights, load_balancing_loss is transformers' load_balancing_loss_func."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(12, 5, generator=g) for _ in range(3))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    ours = load_balancing_loss(logits, 5, 2, mask.reshape(-1).float())
    assert abs(float(ours) - float(load_balancing_loss_func(logits, 5, 2, mask))) <= 1e-6


# ---------------------------------------------------------------------------------------------
# The trainer: coefficient, flag, metric
# ---------------------------------------------------------------------------------------------


def _trainer(model, tmp_path, **loss_kwargs):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    return PreferenceTrainer(model=model, args=args, loss_args=LossArguments(**loss_kwargs),
                             engine_args=EngineArguments(), train_dataset=random_pairs(), pad_token_id=0)


def test_trainer_adds_coef_times_aux_and_logs_it(tmp_path):
    model = tiny_moe("mixtral")
    pairs = random_pairs()
    batch = H.layout(pairs, share_prompt=True, padding_free=True)
    with torch.no_grad():
        aux = float(naive_aux(model, pairs))
        loss, metrics = _trainer(model, tmp_path, loss="cpo").batch_loss_and_metrics(model, batch)
        assert abs(float(metrics["aux_loss"]) - aux) <= 1e-6
        plain = tiny_moe("mixtral", output_router_logits=False)  # same weights, router loss off (as TRL CPO)
        loss0, metrics0 = _trainer(plain, tmp_path, loss="cpo").batch_loss_and_metrics(plain, batch)
        assert "aux_loss" not in metrics0
        assert abs(float(loss) - float(loss0) - 0.02 * aux) <= 1e-6
        # the flag overrides the config's coefficient; 0 turns the term off
        model5 = tiny_moe("mixtral")
        loss5, _ = _trainer(model5, tmp_path, loss="cpo", router_aux_loss_coef=0.5).batch_loss_and_metrics(model5, batch)
        assert abs(float(loss5) - float(loss0) - 0.5 * aux) <= 1e-6
        off = tiny_moe("mixtral")
        loss_off, metrics_off = _trainer(off, tmp_path, loss="cpo", router_aux_loss_coef=0.0).batch_loss_and_metrics(
            off, batch)
        assert "aux_loss" not in metrics_off and router_aux_coef(off) == 0.0
        assert abs(float(loss_off) - float(loss0)) <= 1e-6


def test_configure_engine_records_the_coefficient_and_refuses_bad_ones(make_tiny_llama):
    from preftune.engine.options import configure_engine

    model = tiny_moe("mixtral")
    configure_engine(model, router_aux_loss_coef=0.25)
    assert router_aux_coef(model) == 0.25
    with pytest.raises(ValueError, match="finite number >= 0"):
        configure_engine(model, router_aux_loss_coef=-1.0)
    with pytest.raises(ValueError, match="not a mixture-of-experts model"):
        configure_engine(make_tiny_llama(), router_aux_loss_coef=0.01)


def test_flag_on_a_dense_model_is_a_config_error(tmp_path, make_tiny_llama):
    with pytest.raises(ConfigError, match="not a mixture-of-experts model"):
        _trainer(make_tiny_llama(), tmp_path, loss="cpo", router_aux_loss_coef=0.01)
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        LossArguments(loss="cpo", router_aux_loss_coef=-1.0)


# ---------------------------------------------------------------------------------------------
# TRL 1.16 parity
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer(request):
    from datasets.utils import logging as datasets_logging

    datasets_logging.disable_progress_bar()
    cache = getattr(request.config, "cache", None)
    return H.load_tokenizer(cache.mkdir("preftune-smollm2-tokenizer") if cache is not None else None)


@pytest.fixture(scope="module")
def report():
    """Max |preftune - TRL| per case, printed when the module ends (``pytest -s``; docs/parity.md)."""
    diffs: dict[str, dict[str, float]] = {}
    yield diffs
    print("\n\nTRL 1.16 parity: max |preftune - TRL| over the layouts")
    print(f"{'case':<34}{'loss':>10}{'metrics':>10}{'aux/grad':>10}")
    for case, d in diffs.items():
        cols = [f"{d[k]:10.1e}" if k in d else f"{'-':>10}" for k in ("loss", "metrics", "extra")]
        print(f"{case:<34}{''.join(cols)}")


def _note(report, case, key, diff):
    report.setdefault(case, {})
    report[case][key] = max(report[case].get(key, 0.0), float(diff))


def _trl_moe(kind, tok, seed=0):
    return tiny_moe(kind, vocab_size=len(tok), seed=seed, pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_cpo_trainer_moe_parity(kind, smol_tokenizer, tmp_path, report):
    """TRL CPOTrainer: loss = CPO + cpo_alpha * NLL + coef * outputs.aux_loss (it does not log aux_loss;
    its value is read from TRL's own concatenated_forward)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    base = _trl_moe(kind, smol_tokenizer)
    args = CPOConfig(**H.trl_common_args(tmp_path), max_length=1024, loss_type="sigmoid", beta=0.1, cpo_alpha=1.0)
    trainer = CPOTrainer(model=H.clone(base), args=args, train_dataset=H.dataset(), processing_class=smol_tokenizer)
    assert trainer.aux_loss_enabled
    batch = H.first_batch(trainer)
    trl_loss, trl_metrics = H.trl_step(trainer, batch)
    with torch.no_grad():
        trl_aux = float(trainer.concatenated_forward(trainer.model, batch)[5])
    pairs = H.pairs_from_cpo_batch(batch)
    ours = H.clone(base)
    our_trainer = _trainer(ours, tmp_path / "ours", loss="cpo", beta=0.1, cpo_alpha=1.0)
    for share_prompt, padding_free in H.LAYOUTS:
        laid = H.layout(pairs, share_prompt=share_prompt, padding_free=padding_free,
                        pad_token_id=smol_tokenizer.pad_token_id)
        ours.train()
        with torch.no_grad():
            loss, metrics = our_trainer.batch_loss_and_metrics(ours, laid)
        where = f"{kind} share_prompt={share_prompt} padding_free={padding_free}"
        case = f"cpo-sigmoid {kind}"
        _note(report, case, "loss", abs(float(loss) - float(trl_loss)))
        _note(report, case, "extra", abs(float(metrics["aux_loss"]) - trl_aux))
        assert abs(float(loss) - float(trl_loss)) <= TOL, (where, float(loss), float(trl_loss))
        assert abs(float(metrics["aux_loss"]) - trl_aux) <= TOL, (where, float(metrics["aux_loss"]), trl_aux)
        for k in H.COMPARED + ("nll_loss",):
            _note(report, case, "metrics", abs(float(metrics[k]) - trl_metrics[k]))
            assert abs(float(metrics[k]) - trl_metrics[k]) <= TOL, (where, k)


def test_dpo_trainer_moe_parity_logs_aux_loss(smol_tokenizer, tmp_path, report):
    """TRL DPOTrainer (1.16) adds coef * aux to the loss and logs ``aux_loss``; so does preftune."""
    from trl import DPOConfig, DPOTrainer

    base, ref = _trl_moe("mixtral", smol_tokenizer), _trl_moe("mixtral", smol_tokenizer, seed=1)
    args = DPOConfig(**H.trl_common_args(tmp_path), max_length=1024, precompute_ref_log_probs=False,
                     loss_type=["sigmoid"], beta=0.1)
    trainer = DPOTrainer(model=H.clone(base), ref_model=H.clone(ref), args=args, train_dataset=H.dataset(),
                         processing_class=smol_tokenizer)
    batch = H.first_batch(trainer)
    trl_loss, trl_metrics = H.trl_step(trainer, batch)
    assert "aux_loss" in trl_metrics
    pairs = H.pairs_from_dpo_batch(batch)
    from transformers import TrainingArguments

    ours, ours_ref = H.clone(base), H.clone(ref)
    our_trainer = PreferenceTrainer(model=ours, args=TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none",
                                                                       use_cpu=True),
                                    loss_args=LossArguments(loss="dpo", beta=0.1), engine_args=EngineArguments(),
                                    ref_model=ours_ref, train_dataset=pairs, pad_token_id=smol_tokenizer.pad_token_id)
    for share_prompt, padding_free in [(False, False), (True, True)]:
        laid = H.layout(pairs, share_prompt=share_prompt, padding_free=padding_free,
                        pad_token_id=smol_tokenizer.pad_token_id)
        ours.train()
        with torch.no_grad():
            loss, metrics = our_trainer.batch_loss_and_metrics(ours, laid)
        case = "dpo-sigmoid mixtral"
        _note(report, case, "loss", abs(float(loss) - float(trl_loss)))
        _note(report, case, "extra", abs(float(metrics["aux_loss"]) - trl_metrics["aux_loss"]))
        assert abs(float(loss) - float(trl_loss)) <= TOL
        assert abs(float(metrics["aux_loss"]) - trl_metrics["aux_loss"]) <= TOL
        for k in H.COMPARED:
            _note(report, case, "metrics", abs(float(metrics[k]) - trl_metrics[k]))
            assert abs(float(metrics[k]) - trl_metrics[k]) <= TOL, k
