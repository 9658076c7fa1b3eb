"""KTO and APO-zero unpaired (issue 23): the loss against a naive reference, the whole trainer against TRL
1.16's KTOTrainer (same data, same model, several steps, every engine layout), and the data doors."""

import json
import random

import pytest
import torch
from conftest import random_logp_batch

from preftune.config import LossArguments
from preftune.data.unpaired import UNPAIR_BLOCK, unpair, weight_advice, with_kl_partners
from preftune.errors import ConfigError, DataError
from preftune.losses import compute_loss
from preftune.types import PolicyLogps, TokenizedPair

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WORDS = "the cat sat on a mat dog ran far away sun is hot cold blue green".split()


def naive_kto(c, r, rc, rr, labels, beta, wd, wu, loss_type):
    """Each example alone, in Python floats (Ethayarajh et al. 2024, Eq. 7; TRL 1.16's reading)."""
    import math

    def sig(x):
        return 1 / (1 + math.exp(-x))

    kl = max(0.0, sum(a - b for a, b in zip(r, rr)) / len(r)) if loss_type == "kto" else 0.0
    out = []
    for ci, rci, label in zip(c, rc, labels):
        ratio = ci - rci
        if loss_type == "kto":
            out.append(wd * (1 - sig(beta * (ratio - kl))) if label else wu * (1 - sig(beta * (kl - ratio))))
        else:
            out.append(wd * (1 - sig(beta * ratio)) if label else wu * sig(beta * ratio))
    return sum(out) / len(out), kl


@pytest.mark.parametrize("loss", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("b,dtype", [(1, torch.float64), (5, torch.float64), (16, torch.float32), (7, torch.bfloat16)])
def test_loss_matches_naive_reference_values_and_gradients(loss, b, dtype):
    c, r, lc, lr, rc, rr = random_logp_batch(b, seed=b, noise=0.5)
    labels = torch.arange(b) % 3 != 1
    weights = dict(desirable_weight=1.3, undesirable_weight=0.7)
    args = LossArguments(loss=loss, beta=0.3, **weights)
    leaf = c.clone().to(dtype).requires_grad_(True)
    out = compute_loss(PolicyLogps(leaf, r.to(dtype), lc, lr, rc.to(dtype), rr.to(dtype), labels=labels), args)
    out.losses.mean().backward()
    expect, kl = naive_kto(*(t.to(dtype).double().tolist() for t in (c, r, rc, rr)), labels.tolist(), 0.3, 1.3, 0.7, loss)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert out.losses.mean().item() == pytest.approx(expect, abs=tol)
    assert out.metrics["kl"].item() == pytest.approx(kl, abs=tol)
    # gradient of the mean loss wrt each example's log-prob, by central differences on the naive loss
    base = [float(v) for v in c.to(dtype).double()]
    others = [t.to(dtype).double().tolist() for t in (r, rc, rr)]
    for i in range(b):
        up, down = list(base), list(base)
        up[i] += 1e-5
        down[i] -= 1e-5
        fd = (naive_kto(up, *others, labels.tolist(), 0.3, 1.3, 0.7, loss)[0]
              - naive_kto(down, *others, labels.tolist(), 0.3, 1.3, 0.7, loss)[0]) / 2e-5
        assert leaf.grad[i].double().item() == pytest.approx(fd, abs=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert leaf.grad.dtype == dtype


def test_loss_metrics_only_for_the_kinds_present_and_errors():
    c, r, lc, lr, rc, rr = random_logp_batch(4, seed=1)
    args = LossArguments(loss="kto")
    all_desirable = compute_loss(PolicyLogps(c, r, lc, lr, rc, rr, labels=torch.ones(4, dtype=torch.bool)), args)
    assert "rewards/chosen" in all_desirable.metrics and "rewards/rejected" not in all_desirable.metrics
    assert "rewards/margins" not in all_desirable.metrics and all_desirable.metrics["count/desirable"] == 4
    with pytest.raises(ValueError, match="labels"):
        compute_loss(PolicyLogps(c, r, lc, lr, rc, rr), args)
    with pytest.raises(ConfigError, match="desirable_weight"):
        LossArguments(loss="dpo", desirable_weight=2.0)
    with pytest.raises(ConfigError):
        LossArguments(loss="kto", undesirable_weight=0.0)


def test_unpairing_and_kl_partners_follow_trl_order():
    pairs = [TokenizedPair([i], [100 + i], [200 + i]) for i in range(5)]
    examples = unpair(pairs)
    assert [(e.chosen_ids[0], e.label) for e in examples] == [(100 + i, True) for i in range(5)] + \
        [(200 + i, False) for i in range(5)]
    blocks = unpair([TokenizedPair([0], [1], [2])] * (UNPAIR_BLOCK + 1))
    assert [e.label for e in blocks[UNPAIR_BLOCK - 1:UNPAIR_BLOCK + 2]] == [True, False, False]
    kl = with_kl_partners(examples, batch_size=4, max_length=None)
    # (x_1, y_n), (x_2, y_1), ... within blocks of 4: 100 101 102 103 | 104 200 201 202 | 203 204
    assert [e.rejected_ids[0] for e in kl] == [103, 100, 101, 102, 202, 104, 200, 201, 204, 203]
    capped = with_kl_partners([TokenizedPair([1, 2, 3], [4], [4]), TokenizedPair([5], [6, 7, 8, 9], [6])],
                              batch_size=2, max_length=5)
    assert capped[0].rejected_ids == [6, 7] and capped[1].rejected_ids == [4]
    no_kl = with_kl_partners(examples, batch_size=4, max_length=None, kl=False)
    assert all(e.rejected_ids == e.chosen_ids[-1:] for e in no_kl)
    assert weight_advice(10, 10, 1.0, 1.0) is None and weight_advice(10, 6, 0.7, 1.0) is None
    assert "[1.25, 1.67]" in weight_advice(10, 6, 1.0, 1.0)


# ---- the whole trainer against TRL 1.16 ----------------------------------------------------------


def _records(n=16, seed=0, conversational=False):
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    out = []
    for i in range(n):
        prompt, completion = text(rng.randint(2, 6)), " " + text(rng.randint(1, 5))
        if conversational:
            out.append({"prompt": [{"role": "user", "content": prompt}],
                        "completion": [{"role": "assistant", "content": completion.strip()}], "label": bool(i % 3)})
        else:
            out.append({"prompt": prompt, "completion": completion, "label": bool(i % 3)})
    return out


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    from conftest import save_tiny_model
    from transformers import AutoTokenizer

    path = save_tiny_model(tmp_path_factory.mktemp("tiny-chat"), layers=2)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ref_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with every weight moved by N(0, 0.02): a reference unlike the policy from step 1 on."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    path = tmp_path_factory.mktemp("tiny-ref")
    model.save_pretrained(path)
    return str(path)


def _run(module, model_dir, records, steps=3, ref=None, **fields):
    import tempfile

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if module == "trl":
        from trl import KTOConfig, KTOTrainer
    else:
        from preftune.trl import KTOConfig, KTOTrainer
    args = KTOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=steps, logging_steps=1,
                     learning_rate=3e-2, bf16=False, report_to="none", save_strategy="no", seed=0, **fields)
    ref_model = AutoModelForCausalLM.from_pretrained(ref) if ref else None
    trainer = KTOTrainer(model=model_dir, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


SHARED = ("loss", "grad_norm", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
          "logps/rejected")
_TRL_LOGS: dict = {}


def _trl_logs(model_dir, records, key, **fields):
    if key not in _TRL_LOGS:
        _TRL_LOGS[key] = _run("trl", model_dir, records, **fields)[1]
    return _TRL_LOGS[key]


def _assert_same(ours, theirs):
    """Step 1 (same weights, same batch): loss, metrics and gradient norm within 1e-5; steps 2-3 (after
    AdamW updates, which amplify float-rounding differences in tiny gradient components): within 5e-3."""
    assert len(ours) == len(theirs) == 3
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for key in SHARED:
            assert (key in a) == (key in b), key
            if key in b:
                tol = 1e-5 if step == 0 else 5e-3
                assert a[key] == pytest.approx(b[key], abs=tol, rel=tol), (step, key, a, b)
    assert theirs[-1]["loss"] != theirs[0]["loss"]  # the policy moved


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("layout", [dict(), dict(precompute_ref_log_probs=False), dict(padding_free=False),
                                    dict(share_prompt=False, padding_free=False)])
def test_trainer_matches_trl_kto_trainer(tiny_model_dir, ref_dir, loss_type, layout):
    records = _records()
    theirs = _trl_logs(tiny_model_dir, records, loss_type, loss_type=loss_type, ref=ref_dir)
    _, ours = _run("preftune", tiny_model_dir, records, loss_type=loss_type, ref=ref_dir, **layout)
    _assert_same(ours, theirs)
    assert theirs[0]["rewards/margins"] != 0  # the reference differs from the policy at step 1
    if loss_type == "kto":
        assert max(h["kl"] for h in theirs) > 0.01  # the KL term is exercised (it is clamped at 0 from below)


def test_trainer_matches_trl_on_paired_and_conversational_data(tiny_model_dir, chat_model_dir, ref_dir):
    paired = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " " + r["prompt"]} for r in _records(8)]
    trainer, ours = _run("preftune", tiny_model_dir, paired, ref=ref_dir)
    _assert_same(ours, _trl_logs(tiny_model_dir, paired, "paired", ref=ref_dir))
    assert "16 KTO examples (8 desirable, 8 undesirable; 16 made from 8 pairs" in trainer.data_report
    conversational = _records(conversational=True)
    _, ours = _run("preftune", chat_model_dir, conversational)
    _assert_same(ours, _trl_logs(chat_model_dir, conversational, "conversational"))


# ---- the CLI door and its data ---------------------------------------------------------------------


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _train(model_dir, out, *extra):
    from preftune.cli import main

    return main(["train", "--model_name_or_path", model_dir, "--output_dir", str(out), "--use_peft", "--lora_r", "4",
                 "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
                 "--learning_rate", "1e-2", "--max_length", "256", "--save_strategy", "no", *extra])


def test_cli_trains_every_kto_data_shape(chat_model_dir, tmp_path, caplog):
    swift = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": r["prompt"]},
                           {"role": "assistant", "content": r["completion"]}], "label": r["label"]}
             for r in _records(8)]
    llamafactory = [{"conversations": [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["completion"]}],
                     "label": int(r["label"])} for r in _records(8)]
    shapes = {"trl": _records(8), "conversational": _records(8, conversational=True), "swift": swift,
              "llamafactory": llamafactory}
    for name, records in shapes.items():
        caplog.clear()
        with caplog.at_level("INFO", logger="preftune"):
            assert _train(chat_model_dir, tmp_path / name, "--loss", "kto",
                          "--dataset", _write(tmp_path / f"{name}.jsonl", records)) == 0, name
        assert "format unpaired" in caplog.text and "8 KTO examples (5 desirable, 3 undesirable" in caplog.text
        logs = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs if "loss" in h)


def test_cli_paired_data_reports_the_examples_it_made(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level("INFO", logger="preftune"):
        assert _train(tiny_model_dir, tmp_path / "out", "--loss", "apo_zero_unpaired",
                      "--per_device_train_batch_size", "1", "--max_steps", "1") == 0
    assert "112 KTO examples (56 desirable, 56 undesirable; 112 made from 56 pairs" in caplog.text
    assert "no KL term" in caplog.text


def test_cli_refusals_are_one_line(tiny_model_dir, tmp_path, capsys, caplog):
    data = _write(tmp_path / "kto.jsonl", _records(8))
    assert _train(tiny_model_dir, tmp_path / "a", "--loss", "dpo", "--dataset", data) == 2
    err = capsys.readouterr().err
    assert "kto.jsonl, line 1, field 'label'" in err and "--loss kto / apo_zero_unpaired" in err
    # batch size 1 (LLaMA-Factory's / ms-swift's KTO examples): partners from blocks of 2, never the example itself
    with caplog.at_level("WARNING", logger="preftune"):
        assert _train(tiny_model_dir, tmp_path / "b", "--loss", "kto", "--per_device_train_batch_size", "1",
                      "--max_steps", "1") == 0
    assert "KL estimate rests on 1 mismatched pair" in caplog.text
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": " b", "label": 2}] + _records(3))
    with pytest.raises(DataError, match=r"bad.jsonl, line 1, field 'label': expected true / false"):
        from types import SimpleNamespace

        from preftune.data.formats import normalise
        from preftune.data.loading import load_raw

        normalise(load_raw(bad), SimpleNamespace(dataset_format=None))


def test_cli_kto_on_image_pairs_of_a_vision_language_model(tmp_path, caplog):
    """ms-swift's image pairs unpaired for a tiny LLaVA: each example keeps its prompt's images, the KL partner is
    scored after them; the gradient reaches the LoRA of the language model and the loss moves."""
    from pathlib import Path

    import vlm_tiny as V

    model, processor = V.tiny_vlm("llava")
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    data = Path(__file__).parent.parent / "examples" / "vlm" / "swift_dpo.jsonl"
    with caplog.at_level("INFO", logger="preftune"):
        assert _train(str(tmp_path / "llava"), tmp_path / "out", "--loss", "kto", "--dataset", str(data),
                      "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "5e-2") == 0
    assert "8 KTO examples (4 desirable, 4 undesirable; 8 made from 4 pairs" in caplog.text
    logs = [h for h in json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert logs[0]["loss"] != logs[-1]["loss"]
