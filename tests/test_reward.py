"""Reward models (``--loss rm``): engine rewards, parity with TRL 1.16 ``RewardTrainer``, CLI train /
evaluate / score, outputs that reload with transformers + peft, bad input.

Parity: TRL's own trainer is built on a tiny in-memory dataset with SmolLM2's real tokenizer (its pad
token is its EOS, so transformers reads each reward at the token before the final EOS) and a tiny
random ``LlamaForSequenceClassification``; its first batch is scored by its training-step
``compute_loss``; the same token ids become preftune pairs, scored by the engine in every layout
(share_prompt x padding_free) on an identical copy of the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import trl_helpers as H
from datasets import Dataset
from safetensors.torch import load_file

from preftune.cli import main
from preftune.config import ConfigError, EngineArguments, LossArguments, resolve_reference_options
from preftune.engine.layout import collate_pairs
from preftune.engine.logprobs import sequence_logps
from preftune.engine.rewards import sequence_rewards
from preftune.errors import UnsupportedModelError
from preftune.losses import compute_loss, rm_loss
from preftune.types import PairRewards, PolicyLogps, TokenizedPair

TOL = 1e-5
GRAD_RTOL = 1e-5
METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")


def tiny_reward_model(vocab_size: int, pad_token_id: int, seed: int = 0, eos_token_id: int = 2):
    """A tiny random float32 LlamaForSequenceClassification with one label (no dropout)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id, attn_implementation="sdpa",
                         attention_dropout=0.0, initializer_range=0.2)
    return LlamaForSequenceClassification(config).float()


def hf_reward(model, ids: list[int]) -> float:
    """transformers' own reward of one sequence (the classifier's forward, batch of one)."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def test_value_head_kind_answers_its_questions(tmp_path):
    """The value-head kind: loading class, PEFT task, data preparation, tokenizer facts, extra files."""
    from types import SimpleNamespace

    from preftune.data import PreferenceData
    from preftune.engine.kinds import kind_for, kind_for_config

    model = tiny_reward_model(40, 0)
    kind = kind_for(model)
    assert (kind.name, kind.scores, kind.peft_task_type, kind.modules_to_save) == ("value_head", "rewards", "SEQ_CLS",
                                                                                    ["score"])
    assert kind_for_config(model.config, reward_model=True) is kind
    assert kind.auto_class == "AutoModelForSequenceClassification" and kind.load_kwargs() == {"num_labels": 1}
    assert kind_for_config(model.config).auto_class == "AutoModelForCausalLM"
    same = TokenizedPair([5], [8, 2], [8, 2])
    data = kind.prepare_data(PreferenceData([PAIRS[0], same, PAIRS[1]], None, "report", "standard"))
    assert data.train == [PAIRS[0], PAIRS[1]] and data.report.endswith(
        "data: rm: 1 pairs with identical chosen and rejected tokens skipped, 2 kept, 1 with a margin")
    model.config.pad_token_id = None
    kind.ready(model, SimpleNamespace(pad_token_id=3))
    assert model.config.pad_token_id == 3
    assert [p.name for p in kind.save_extras(model, tmp_path)] == ["value_head.safetensors"]
    assert kind.tokenize_options(model) == {}


# ---------------------------------------------------------------------------------------------
# Engine: the value-head kind reads the reward where transformers does
# ---------------------------------------------------------------------------------------------

PAIRS = [TokenizedPair([5, 6, 7], [8, 9, 2], [10, 2]), TokenizedPair([5], [11, 2], [12, 13, 14, 2], margin=0.5),
         TokenizedPair([1, 3], [2], [4, 4, 2]), TokenizedPair([7, 7, 7, 7], [9, 9, 9, 9, 2], [2])]


@pytest.mark.parametrize("pad", [0, 2], ids=["pad!=eos", "pad==eos"])
@pytest.mark.parametrize("share_prompt,padding_free", H.LAYOUTS)
def test_rewards_equal_sequence_classifier_forward(pad, share_prompt, padding_free):
    model = tiny_reward_model(40, pad).eval()
    batch = collate_pairs(PAIRS, share_prompt=share_prompt, padding_free=padding_free, pad_token_id=pad,
                          max_tokens_per_batch=24)
    if padding_free:
        assert int(batch["segment_ids"].max()) >= 1  # several units per row
    with torch.no_grad():
        rewards = sequence_rewards(model, batch)
    want_c = torch.tensor([hf_reward(model, p.prompt_ids + p.chosen_ids) for p in PAIRS])
    want_r = torch.tensor([hf_reward(model, p.prompt_ids + p.rejected_ids) for p in PAIRS])
    assert torch.allclose(rewards.chosen_rewards, want_c, atol=1e-5, rtol=0)
    assert torch.allclose(rewards.rejected_rewards, want_r, atol=1e-5, rtol=0)
    assert rewards.margin.tolist() == [0.0, 0.5, 0.0, 0.0]
    # pair 3's rejected completion is only the EOS: with pad == eos the reward sits on the prompt's last token
    flat = batch["input_ids"].reshape(-1)
    assert int(flat[batch["last_index"][len(PAIRS) + 3]]) == (7 if pad == 2 else 2)


def test_rewards_follow_the_memory_budget_and_keep_gradients():
    """A training forward of a reward model plans layer checkpointing from --max_activation_memory_gb
    and trims the heap, as the log-prob kinds do; checkpointed or not, the gradients are the same."""
    from preftune.engine.memory import decoder_layers
    from preftune.engine.options import configure_engine

    grads = []
    for budget, want_checkpointed in ((float("inf"), 0), (1e-9, 2)):
        model = tiny_reward_model(40, 0).train()
        configure_engine(model, max_activation_memory_gb=budget)
        batch = collate_pairs(PAIRS, share_prompt=True, padding_free=True, pad_token_id=0, max_tokens_per_batch=24)
        r = sequence_rewards(model, batch)
        (r.chosen_rewards - r.rejected_rewards).sum().backward()
        layers = decoder_layers(model)
        assert sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers) == want_checkpointed
        assert getattr(model, "_preftune_trim_enabled", (False,))[0] is True  # --malloc_trim's default, applied
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_reward_model_refuses_logps_and_causal_model_refuses_rewards(make_tiny_llama):
    batch = collate_pairs(PAIRS[:2], pad_token_id=0)
    with pytest.raises(UnsupportedModelError, match="reward model"):
        sequence_logps(tiny_reward_model(40, 0), batch)
    with pytest.raises(UnsupportedModelError, match="no value head"):
        sequence_rewards(make_tiny_llama(vocab_size=40), batch)
    with pytest.raises(ValueError, match="pad id 2"):
        sequence_rewards(tiny_reward_model(40, 0), collate_pairs(PAIRS[:2], pad_token_id=2))


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------

def test_rm_loss_formula_margin_and_centering():
    torch.manual_seed(0)
    c, r, m = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    for margin, coef in ((None, None), (m, None), (None, 0.3), (m, 0.3)):
        out = rm_loss(PairRewards(c, r, margin), center_rewards_coefficient=coef)
        z = c - r - (0 if margin is None else margin)
        want = torch.log1p(torch.exp(-z)).mean() + (coef or 0.0) * ((c + r) ** 2).mean()
        assert abs(out.losses.mean().item() - want.item()) < 1e-12
        assert out.metrics["accuracy"].item() == pytest.approx(float((c > r).double().mean()))
        assert out.metrics["margin"].item() == pytest.approx(float((c - r).mean()))
        both = torch.cat([c, r])
        assert (out.metrics["min_reward"], out.metrics["max_reward"]) == (both.min(), both.max())
    # gradient of the margin term: d/dc -log sigmoid(c - r - m) = -(1 - sigmoid(c - r - m))
    cg = c.clone().requires_grad_()
    rm_loss(PairRewards(cg, r, m)).losses.sum().backward()
    assert torch.allclose(cg.grad, -(1 - torch.sigmoid(c - r - m)))


def test_rm_loss_bad_inputs():
    good = PairRewards(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="non-finite"):
        rm_loss(PairRewards(torch.zeros(2), torch.ones(2), torch.tensor([0.0, float("nan")])))
    with pytest.raises(ValueError, match="shape"):
        rm_loss(PairRewards(torch.zeros(2), torch.ones(3)))
    with pytest.raises(ValueError, match="PairRewards"):
        compute_loss(PolicyLogps(torch.zeros(2), torch.ones(2), torch.ones(2), torch.ones(2)), LossArguments(loss="rm"))
    with pytest.raises(ValueError, match="PolicyLogps"):
        compute_loss(good, LossArguments(loss="cpo"))


def test_rm_config_errors():
    for kwargs, match in ((dict(loss="rm", beta=0.1), "--beta"), (dict(loss="rm", label_smoothing=0.1), "smoothing"),
                          (dict(loss="cpo", center_rewards_coefficient=0.1), "rm only"),
                          (dict(loss="rm", center_rewards_coefficient=-1.0), ">= 0")):
        with pytest.raises(ConfigError, match=match):
            LossArguments(**kwargs)
    rm = LossArguments(loss="rm")
    with pytest.raises(ConfigError, match="precompute_ref_log_probs"):
        resolve_reference_options(rm, EngineArguments(precompute_ref_log_probs=True))
    with pytest.raises(ConfigError, match="reference model"):
        resolve_reference_options(rm, EngineArguments(), has_ref_model=True)
    engine = EngineArguments()  # left unset: fine, and turned off for rm
    resolve_reference_options(rm, engine)
    assert engine.precompute_ref_log_probs is False
    assert EngineArguments().precompute_ref_log_probs is True  # the default of the other losses


# ---------------------------------------------------------------------------------------------
# Parity with TRL 1.16 RewardTrainer
# ---------------------------------------------------------------------------------------------

MARGINS = [0.5, 0.0, 1.5, -0.25]
CENTERING = (None, 0.05)  # TRL's default (no centering) and a centering weight
@pytest.fixture(scope="module")
def smol_tokenizer(request):
    from datasets.utils import logging as datasets_logging

    enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    cache = getattr(request.config, "cache", None)
    yield H.load_tokenizer(cache.mkdir("preftune-smollm2-tokenizer") if cache is not None else None)
    if enabled:
        datasets_logging.enable_progress_bar()


def pairs_from_reward_batch(batch) -> list[TokenizedPair]:
    """TRL RewardTrainer batch (rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected, right-padded) ->
    pairs: the shared prompt is the common prefix of the two rows (leaving each completion >= 1 token)."""
    ids, att = batch["input_ids"], batch["attention_mask"]
    b = ids.shape[0] // 2
    pairs = []
    for i in range(b):
        c, r = ids[i][att[i].bool()].tolist(), ids[b + i][att[b + i].bool()].tolist()
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
            n += 1
        assert n >= 1
        margin = float(batch["margin"][i]) if "margin" in batch else None
        pairs.append(TokenizedPair(c[:n], c[n:], r[n:], margin=margin))
    return pairs


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("with_margin", [False, True], ids=["no-margin", "margin"])
def test_reward_trainer_parity(with_margin, smol_tokenizer, tmp_path):
    """Loss, TRL's metrics and every parameter gradient, with and without centering, in every layout."""
    from trl import RewardConfig, RewardTrainer

    tok = smol_tokenizer
    base = tiny_reward_model(len(tok), tok.pad_token_id, eos_token_id=tok.eos_token_id)
    records = [dict(r, margin=m) if with_margin else dict(r) for r, m in zip(H.RECORDS, MARGINS)]
    args = RewardConfig(**H.trl_common_args(tmp_path), max_length=1024)
    trainer = RewardTrainer(model=H.clone(base), args=args, train_dataset=Dataset.from_list(records),
                            processing_class=tok)
    batch = H.first_batch(trainer)
    assert ("margin" in batch) == with_margin
    pairs = pairs_from_reward_batch(batch)
    assert all(p.chosen_ids[-1] == tok.eos_token_id == tok.pad_token_id for p in pairs)  # the pad == eos case
    ours = H.clone(base)
    for coef in CENTERING:
        trainer.args.center_rewards_coefficient = coef  # read by RewardTrainer.compute_loss at each call
        trainer.model.zero_grad(set_to_none=True)
        trl_loss, trl_metrics = H.trl_step(trainer, batch)
        trl_loss.backward()
        trl_grads = _grads(trainer.model)
        scale = max(g.abs().max().item() for g in trl_grads)
        assert scale > 0 and trl_metrics["margin"] != 0.0
        loss_args = LossArguments(loss="rm", center_rewards_coefficient=coef)
        for share_prompt, padding_free in H.LAYOUTS:
            where = f"margin={with_margin} center={coef} share_prompt={share_prompt} padding_free={padding_free}"
            laid_out = H.layout(pairs, share_prompt=share_prompt, padding_free=padding_free,
                                pad_token_id=tok.pad_token_id)
            ours.train()
            out = compute_loss(sequence_rewards(ours, laid_out), loss_args)
            loss = out.losses.mean()
            assert abs(loss.item() - trl_loss.item()) <= TOL, where
            for key in METRICS:
                assert abs(float(out.metrics[key]) - trl_metrics[key]) <= TOL, f"{where}: {key}"
            loss.backward()
            worst = max((a - b).abs().max().item() for a, b in zip(_grads(ours), trl_grads))
            ours.zero_grad(set_to_none=True)
            assert worst <= GRAD_RTOL * scale, f"{where}: grad diff {worst:.2e} vs max |grad| {scale:.2e}"


def test_preference_trainer_rm_branch(tmp_path):
    """PreferenceTrainer's --loss rm path: the table entry on the engine's rewards, TRL's metric names."""
    from transformers import TrainingArguments

    from preftune.trainer import PreferenceTrainer

    model = tiny_reward_model(40, 0)
    targs = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    loss_args = LossArguments(loss="rm", center_rewards_coefficient=0.1)
    trainer = PreferenceTrainer(model=model, args=targs, loss_args=loss_args, engine_args=EngineArguments(),
                                train_dataset=PAIRS)
    batch = collate_pairs(PAIRS, pad_token_id=0)
    with torch.no_grad():
        loss, metrics = trainer.batch_loss_and_metrics(model, batch)
        want = rm_loss(sequence_rewards(model, batch), center_rewards_coefficient=0.1)
    assert set(metrics) == set(METRICS)
    assert loss.item() == pytest.approx(want.losses.mean().item(), abs=1e-7)
    with pytest.raises(ConfigError, match="reference model"):
        PreferenceTrainer(model=model, args=targs, loss_args=LossArguments(loss="rm"), engine_args=EngineArguments(),
                          train_dataset=PAIRS, ref_model=tiny_reward_model(40, 0))


# ---------------------------------------------------------------------------------------------
# CLI: train -> outputs that reload as a sequence classifier; evaluate; score
# ---------------------------------------------------------------------------------------------

RM_RECORDS = [
    {"id": f"r{i}", "prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
     "rejected": f" Maybe {i + 7}, or something else entirely.", "margin": 0.25 * (i % 3)}
    for i in range(10)
] + [{"id": "same", "prompt": "Say yes.", "chosen": " Yes.", "rejected": " Yes."}]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rm_flags(model_dir, out, data, *extra):
    return ["--model_name_or_path", model_dir, "--output_dir", str(out), "--dataset", str(data), "--loss", "rm",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--learning_rate", "1e-2",
            "--save_strategy", "no", "--seed", "3", "--report_to", "none", "--dataloader_num_workers", "0", *extra]


def reload_reward_model(model_dir, out):
    """What a user does: transformers' classifier over the base + peft's adapter."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, pad_token_id=0)
    return PeftModel.from_pretrained(base, str(out)).eval()


@pytest.fixture(scope="module")
def trained_rm(tiny_model_dir, tmp_path_factory):
    """A 2-step LoRA reward model on the tiny Llama (byte tokenizer: pad 0, eos 2)."""
    root = tmp_path_factory.mktemp("rm")
    data = write_jsonl(root / "pairs.jsonl", RM_RECORDS)
    out = root / "out"
    assert main(["train", *rm_flags(tiny_model_dir, out, data, "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
                                    "--eval_ratio", "0.3", "--eval_strategy", "steps", "--eval_steps", "2")]) == 0
    return out, data


def test_cli_train_rm_outputs_reload(trained_rm, tiny_model_dir, tmp_path):
    out, data = trained_rm
    for name in ("adapter_model.safetensors", "adapter_config.json", "value_head.safetensors", "tokenizer.json",
                 "trainer_state.json", "train_results.json", "eval_results.json", "preftune_config.yaml"):
        assert (out / name).is_file(), name
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in history if "loss" in h]
    assert len(train_logs) == 2 and all(k in train_logs[0] for k in METRICS)
    assert all(f"eval_{k}" in json.loads((out / "eval_results.json").read_text()) for k in METRICS)
    report_lines = [x for x in (out / "data_report.txt").read_text().splitlines() if "rm: " in x]
    assert len(report_lines) == 2  # train and eval split, the one identical pair skipped in one of them
    assert sum(int(x.split("rm: ")[1].split()[0]) for x in report_lines) == 1

    model = reload_reward_model(tiny_model_dir, out)
    head = load_file(str(out / "value_head.safetensors"))
    assert set(head) == {"v_head.summary.weight", "v_head.summary.bias"}
    trained_head = model.get_base_model().score.modules_to_save["default"].weight
    assert torch.equal(head["v_head.summary.weight"], trained_head.detach())
    initial = initial_head(tiny_model_dir, seed=3)
    assert not torch.allclose(head["v_head.summary.weight"], initial)  # the head was trained (and saved)

    scores = tmp_path / "scores.jsonl"
    assert main(["score", "--adapter", str(out), "--dataset", str(data), "--output", str(scores),
                 "--batch_size", "3"]) == 0
    lines = [json.loads(x) for x in scores.read_text().splitlines()]
    assert [line["id"] for line in lines] == [r["id"] for r in RM_RECORDS]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    for record, line in list(zip(RM_RECORDS, lines))[-4:]:  # the identical pair and three others
        prompt = tok(record["prompt"])["input_ids"]
        for side in ("chosen", "rejected"):
            ids = prompt + tok(record[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert line[f"{side}_reward"] == pytest.approx(hf_reward(model, ids), abs=1e-5)
            # the value-head file alone reproduces the reward from the body's last hidden state
            with torch.no_grad():
                hidden = model.get_base_model().model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            assert float(hidden @ head["v_head.summary.weight"][0] + head["v_head.summary.bias"][0]) == \
                pytest.approx(line[f"{side}_reward"], abs=1e-5)

    report = tmp_path / "eval.json"
    assert main(["evaluate", "--loss", "rm", "--adapter", str(out), "--dataset", str(data),
                 "--output_json", str(report)]) == 0
    metrics = json.loads(report.read_text())
    margins = [line["chosen_reward"] - line["rejected_reward"] for line in lines if line["id"] != "same"]
    assert metrics["num_pairs"] == 10 and metrics["num_identical_skipped"] == 1
    assert metrics["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 10)
    assert metrics["margin"] == pytest.approx(sum(margins) / 10, abs=1e-6)


def initial_head(model_dir, seed: int) -> torch.Tensor:
    """The head the run started from: the seed is set right before the model is loaded."""
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).score.weight.detach()


def test_cli_score_best_of_n(trained_rm, tiny_model_dir, tmp_path):
    out, _ = trained_rm
    records = [{"id": "q1", "prompt": "Pick a fruit:", "completions": [" apple", " banana split", " kiwi"]},
               {"prompt": "Count:", "completions": [" one two three"]}]
    data = write_jsonl(tmp_path / "bon.jsonl", records)
    scores = tmp_path / "bon_scores.jsonl"
    assert main(["score", "--adapter", str(out), "--dataset", str(data), "--output", str(scores)]) == 0
    lines = [json.loads(x) for x in scores.read_text().splitlines()]
    model = reload_reward_model(tiny_model_dir, out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert lines[0]["id"] == "q1" and "id" not in lines[1] and [line["index"] for line in lines] == [0, 1]
    for record, line in zip(records, lines):
        want = [hf_reward(model, tok(record["prompt"])["input_ids"] + tok(c, add_special_tokens=False)["input_ids"]
                          + [tok.eos_token_id]) for c in record["completions"]]
        assert line["rewards"] == pytest.approx(want, abs=1e-5)
        assert line["best"] == max(range(len(want)), key=want.__getitem__)


def test_cli_score_refuses_non_reward_models(tiny_model_dir, tmp_path, capsys):
    from preftune.config import ModelArguments, PeftArguments
    from preftune.models import load_model_and_tokenizer

    data = write_jsonl(tmp_path / "p.jsonl", RM_RECORDS[:2])
    policy, _ = load_model_and_tokenizer(ModelArguments(model_name_or_path=tiny_model_dir),
                                         PeftArguments(use_peft=True, lora_r=2))
    policy.save_pretrained(str(tmp_path / "policy"))
    for path, match in ((tmp_path / "policy", "task_type CAUSAL_LM"), (Path(tiny_model_dir), "LlamaForCausalLM"),
                        (tmp_path, "neither adapter_config.json nor config.json")):
        capsys.readouterr()
        assert main(["score", "--adapter", str(path), "--dataset", str(data), "--output",
                     str(tmp_path / "s.jsonl")]) == 2
        err = capsys.readouterr().err
        assert "not a reward model" in err and match in err, err


def test_cli_full_finetune_rm_is_a_sequence_classifier(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "p.jsonl", RM_RECORDS[:6])
    out = tmp_path / "full"
    assert main(["train", *rm_flags(tiny_model_dir, out, data, "--max_steps", "1")]) == 0
    assert (out / "value_head.safetensors").is_file() and (out / "config.json").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == 0
    head = load_file(str(out / "value_head.safetensors"))["v_head.summary.weight"]
    assert torch.equal(head, model.score.weight.detach())
    scores = tmp_path / "s.jsonl"
    assert main(["score", "--adapter", str(out), "--dataset", str(data), "--output", str(scores)]) == 0
    first = json.loads(scores.read_text().splitlines()[0])
    assert math.isfinite(first["chosen_reward"])


def test_cli_rm_bad_input(tiny_model_dir, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", RM_RECORDS[:4])
    cases = [
        (["--precompute_ref_log_probs", "true"], good, "--precompute_ref_log_probs does not apply to --loss rm"),
        ([], write_jsonl(tmp_path / "nan.jsonl", [RM_RECORDS[0], dict(RM_RECORDS[1], margin=float("nan"))]),
         "line 2, field 'margin'"),
        ([], write_jsonl(tmp_path / "text.jsonl", [dict(RM_RECORDS[0], margin="high")]), "line 1, field 'margin'"),
        ([], write_jsonl(tmp_path / "empty.jsonl", [dict(RM_RECORDS[0], rejected="  ")]), "field 'rejected'"),
        ([], write_jsonl(tmp_path / "same.jsonl", [RM_RECORDS[-1]] * 3), "identical"),
    ]
    for extra, data, match in cases:
        capsys.readouterr()
        assert main(["train", *rm_flags(tiny_model_dir, tmp_path / "x", data, *extra)]) == 2
        err = capsys.readouterr().err
        assert match in err, err
