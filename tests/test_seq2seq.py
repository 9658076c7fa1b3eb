"""Encoder–decoder models (engine/kinds/seq2seq.py, engine/layout_seq2seq.py) on tiny random T5 /
mT5 / BART-family configs: the head reproduces ``model(...).logits``; every layout gives the naive
log-probs (each sequence alone through ``model(...)``, full logits) and their gradients; TRL 1.16's
CPOTrainer / ORPOTrainer encoder–decoder paths give the same loss and metrics; the CLI trains every
loss, resumes, generates and translates; unsupported architectures fail with one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import trl_helpers as H

from preftune.config import LossArguments
from preftune.engine.kinds import collate_for, kind_for, kind_for_config
from preftune.engine.kinds.seq2seq import SUPPORTED, seq2seq_head
from preftune.engine.layout_seq2seq import collate_seq2seq
from preftune.engine.logprobs import sequence_logps
from preftune.errors import UnsupportedModelError
from preftune.losses import compute_loss, orpo_loss
from preftune.types import TokenizedPair

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")

TOL = 1e-5
V = 96


# ---------------------------------------------------------------------------------------------
# Tiny models and tokenizers
# ---------------------------------------------------------------------------------------------


def seq2seq_tokenizer(template: str):
    """The byte tokenizer of conftest (<pad> 0, <s> 1, </s> 2) whose special tokens follow ``template``:
    ``"$A </s>"`` (T5) or ``"<s> $A </s>"`` (BART)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny(model_type: str, vocab_size: int = V, seed: int = 0, tie: bool = True):
    """A tiny random encoder–decoder LM of ``model_type`` (float32, no dropout; pad 0, bos 1, eos 2)."""
    import transformers as tf

    torch.manual_seed(seed)
    ids = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type in ("t5", "mt5"):
        cfg_cls, cls = {"t5": (tf.T5Config, tf.T5ForConditionalGeneration),
                        "mt5": (tf.MT5Config, tf.MT5ForConditionalGeneration)}[model_type]
        config = cfg_cls(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0,
                         tie_word_embeddings=tie, initializer_factor=0.3 if tie else 0.1, **ids)
        return cls(config).float().eval()
    classes = {"bart": (tf.BartConfig, tf.BartForConditionalGeneration),
               "mbart": (tf.MBartConfig, tf.MBartForConditionalGeneration),
               "marian": (tf.MarianConfig, tf.MarianMTModel),
               "pegasus": (tf.PegasusConfig, tf.PegasusForConditionalGeneration),
               "m2m_100": (tf.M2M100Config, tf.M2M100ForConditionalGeneration)}
    cfg_cls, cls = classes[model_type]
    config = cfg_cls(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, decoder_start_token_id=2,
                     init_std=0.2, **ids)
    model = cls(config).float().eval()
    if hasattr(model, "final_logits_bias"):  # zeros at init: make the head test see it
        with torch.no_grad():
            model.final_logits_bias.normal_()
    return model


def random_pairs(n: int = 5, vocab: int = V, seed: int = 1) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    return [TokenizedPair(ids(3 + 2 * i), ids(2 + (i * 3) % 5), ids(1 + (i * 2) % 6)) for i in range(n)]


def naive_logps(model, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log P(y_t | prompt, y_<t) of each completion alone: ``model(input_ids=prompt,
    decoder_input_ids=[start] + y[:-1]).logits``, full vocabulary, float32 log-softmax."""
    start = model.config.decoder_start_token_id
    sums = {0: [], 1: []}
    for p in pairs:
        for side, y in enumerate((p.chosen_ids, p.rejected_ids)):
            logits = model(input_ids=torch.tensor([p.prompt_ids]),
                           decoder_input_ids=torch.tensor([[start] + y[:-1]])).logits[0]
            sums[side].append(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(y)[:, None]).sum())
    return torch.stack(sums[0]), torch.stack(sums[1])


def layouts(model, pairs):
    collate = collate_for(model)
    budget = 2 * max(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    for share_prompt, padding_free in H.LAYOUTS:
        yield (share_prompt, padding_free), collate(pairs, share_prompt=share_prompt, padding_free=padding_free,
                                                     max_tokens_per_batch=budget)


# ---------------------------------------------------------------------------------------------
# Engine: head, layouts, gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", [*SUPPORTED, "t5-untied"])
def test_head_reproduces_model_logits_and_naive_logps(model_type):
    """Decoder hidden state -> our head equals model(...).logits (T5's d_model**-0.5 rescale, BART's
    final_logits_bias), and the plain layout gives the naive log-probs."""
    model = tiny(model_type.split("-")[0], tie=not model_type.endswith("untied"))
    assert kind_for(model).name == "seq2seq"
    pairs = random_pairs(3)
    p = pairs[0]
    start = model.config.decoder_start_token_id
    enc, dec = torch.tensor([p.prompt_ids]), torch.tensor([[start] + p.chosen_ids[:-1]])
    with torch.no_grad():
        full = model(input_ids=enc, decoder_input_ids=dec)
        hidden = model.get_decoder()(input_ids=dec, encoder_hidden_states=full.encoder_last_hidden_state
                                     ).last_hidden_state
        assert torch.allclose(seq2seq_head(model)(hidden), full.logits, atol=1e-5, rtol=1e-5)
        nc, nr = naive_logps(model, pairs)
        out = sequence_logps(model, collate_for(model)(pairs, share_prompt=False, padding_free=False), chunk_size=5)
    assert torch.allclose(out.chosen_logps, nc, atol=TOL, rtol=1e-6)
    assert torch.allclose(out.rejected_logps, nr, atol=TOL, rtol=1e-6)


@pytest.mark.parametrize("model_type", ["t5", "mt5", "bart"])
def test_every_layout_gives_naive_logps_and_gradients(model_type):
    model = tiny(model_type)
    pairs = random_pairs()
    model.zero_grad()
    nc, nr = naive_logps(model, pairs)
    (nc.sum() + 0.5 * nr.sum()).backward()
    ref = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    scale = max(g.abs().max() for g in ref.values())
    for layout, batch in layouts(model, pairs):
        model.zero_grad()
        out = sequence_logps(model, batch, chunk_size=7)
        assert torch.allclose(out.chosen_logps, nc.detach(), atol=TOL, rtol=1e-6), layout
        assert torch.allclose(out.rejected_logps, nr.detach(), atol=TOL, rtol=1e-6), layout
        assert out.chosen_lengths.tolist() == [len(p.chosen_ids) for p in pairs]
        (out.chosen_logps.sum() + 0.5 * out.rejected_logps.sum()).backward()
        params = dict(model.named_parameters())
        worst = max((params[n].grad - g).abs().max() for n, g in ref.items())
        assert worst <= 1e-5 * scale, (layout, float(worst), float(scale))


def test_layouts_pack_where_the_model_allows_it(caplog, monkeypatch):
    import preftune.engine.layout_seq2seq as L

    monkeypatch.setattr(L, "_FALLBACK_LOGGED", set())  # logged once per model type and process
    pairs = random_pairs(6)
    t5, bart = tiny("t5"), tiny("bart")
    batch = collate_for(t5)(pairs, share_prompt=True, padding_free=True, max_tokens_per_batch=30)
    assert batch["decoder_input_ids"].shape[0] < len(pairs) and int(batch["packed"]) == 1
    assert int(batch["decoder_segment_ids"].max()) >= 3  # several pairs' [C R] in one row
    assert batch["input_ids"].shape[0] == batch["decoder_input_ids"].shape[0]  # their prompts beside them
    shared = collate_for(t5)(pairs, share_prompt=True, padding_free=False)
    assert shared["decoder_input_ids"].shape[0] == len(pairs) and shared["input_ids"].shape[0] == len(pairs)
    caplog.set_level("INFO", logger="preftune.engine")
    for share_prompt, padding_free in H.LAYOUTS:  # BART: absolute positions, padded rows of one sequence
        b = collate_for(bart)(pairs, share_prompt=share_prompt, padding_free=padding_free)
        assert b["decoder_input_ids"].shape[0] == 2 * len(pairs) and int(b["packed"]) == 0
        assert b["input_ids"].shape[0] == len(pairs)  # the encoder runs once per pair
        assert b["decoder_input_ids"][:, 0].eq(2).all()  # decoder_start_token_id first
    assert any("padded decoder rows" in r.getMessage() for r in caplog.records)


def test_eager_attention_packed_rows_agree():
    model = tiny("t5")
    model.config._attn_implementation = "eager"
    for module in model.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"
    pairs = random_pairs(4)
    with torch.no_grad():
        nc, _ = naive_logps(model, pairs)
        for layout, batch in layouts(model, pairs):
            assert torch.allclose(sequence_logps(model, batch).chosen_logps, nc, atol=TOL, rtol=1e-6), layout


def test_collate_seq2seq_inputs_are_shifted_labels():
    pair = TokenizedPair([5, 6, 7], [10, 11, 12], [20])
    b = collate_seq2seq([pair], share_prompt=False, padding_free=False, pad_token_id=0, decoder_start_token_id=9)
    assert b["decoder_input_ids"].tolist() == [[9, 10, 11], [9, 0, 0]]
    assert b["target_ids"].tolist() == [10, 11, 12, 20] and b["target_seq"].tolist() == [0, 0, 0, 1]
    assert b["input_ids"].tolist() == [[5, 6, 7]]
    with pytest.raises(ValueError, match="empty prompt"):
        collate_seq2seq([TokenizedPair([], [1], [2])])


# ---------------------------------------------------------------------------------------------
# TRL 1.16 parity (CPOTrainer / ORPOTrainer encoder–decoder paths)
# ---------------------------------------------------------------------------------------------

TEMPLATES = {"t5": "$A </s>", "bart": "<s> $A </s>"}
# Short texts: the byte-level tokenizer gives one token per character, and float32 sums of long
# completions differ between any two summation orders by ~1e-5 (|log p| ~ 100), which would hide
# the comparison's point.
SHORT = [{"prompt": "2+2=", "chosen": " 4", "rejected": " five"},
         {"prompt": "Capital of Italy?", "chosen": " Rome", "rejected": " Milan!"},
         {"prompt": "Say hi.", "chosen": " Hi there", "rejected": " No"},
         {"prompt": "Sky colour:", "chosen": " blue", "rejected": " green-ish"}]


def short_dataset():
    from datasets import Dataset

    return Dataset.from_list(SHORT)


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


def pairs_from_seq2seq_batch(batch) -> list[TokenizedPair]:
    """TRL's encoder–decoder batch (``prompt_input_ids`` + mask, ``{chosen,rejected}_labels`` padded
    with -100) as pairs of the very same token ids."""
    pairs = []
    for i in range(batch["prompt_input_ids"].shape[0]):
        prompt = batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()].tolist()
        c, r = (batch[f"{k}_labels"][i] for k in ("chosen", "rejected"))
        pairs.append(TokenizedPair(prompt, c[c != -100].tolist(), r[r != -100].tolist()))
    return pairs


CPO_CASES = {
    "cpo-sigmoid": (dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0), dict(loss="cpo", beta=0.1, cpo_alpha=1.0)),
    "simpo": (dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0),
              dict(loss="simpo", beta=2.0, simpo_gamma=0.5)),
    "cpo-simpo": (dict(loss_type="simpo", beta=2.0, simpo_gamma=0.3, cpo_alpha=1.0),
                  dict(loss="cpo-simpo", beta=2.0, simpo_gamma=0.3, cpo_alpha=1.0)),
}


def _trl_model(model_type):
    tok = seq2seq_tokenizer(TEMPLATES[model_type])
    return tok, tiny(model_type, vocab_size=len(tok))


@pytest.mark.parametrize("model_type,case", [("t5", "cpo-sigmoid"), ("t5", "simpo"), ("t5", "cpo-simpo"),
                                             ("bart", "cpo-sigmoid")])
def test_cpo_trainer_encoder_decoder_parity(model_type, case, tmp_path, report):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok, base = _trl_model(model_type)
    trl_kwargs, loss_kwargs = CPO_CASES[case]
    args = CPOConfig(**H.trl_common_args(tmp_path), max_length=1024, max_completion_length=256, **trl_kwargs)
    trainer = CPOTrainer(model=H.clone(base), args=args, train_dataset=short_dataset(), processing_class=tok)
    assert trainer.is_encoder_decoder
    batch = H.first_batch(trainer)
    grads = case == "cpo-sigmoid"
    trainer.model.zero_grad()
    trl_loss, trl_metrics = H.trl_step(trainer, batch)
    if grads:
        trl_loss.backward()
        trl_grads = [q.grad.clone() if q.grad is not None else torch.zeros_like(q) for q in trainer.model.parameters()]
    pairs = pairs_from_seq2seq_batch(batch)
    assert all(p.prompt_ids[-1] == p.chosen_ids[-1] == 2 for p in pairs)  # the tokenizer's </s> on both sides
    ours = H.clone(base)
    for layout, laid in layouts(ours, pairs):
        ours.train()
        ours.zero_grad()
        with torch.set_grad_enabled(grads):
            logps = sequence_logps(ours, laid, chunk_size=32)
            out = compute_loss(logps, LossArguments(**loss_kwargs))
            loss = out.losses.mean()
        name = f"{case} {model_type}"
        _note(report, name, "loss", abs(float(loss) - float(trl_loss)))
        assert abs(float(loss) - float(trl_loss)) <= TOL, (layout, float(loss), float(trl_loss))
        metrics = out.metrics  # TRL's names (rewards/*, logps/*)
        for k in H.COMPARED + ("nll_loss",):
            _note(report, name, "metrics", abs(float(metrics[k]) - trl_metrics[k]))
            assert abs(float(metrics[k]) - trl_metrics[k]) <= TOL, (layout, k, float(metrics[k]), trl_metrics[k])
        if grads:
            loss.backward()
            mine = [q.grad if q.grad is not None else torch.zeros_like(q) for q in ours.parameters()]
            scale = max(g.abs().max() for g in trl_grads)
            worst = max((a - b).abs().max() for a, b in zip(mine, trl_grads))
            _note(report, name, "extra", worst / scale)
            assert worst <= 1e-5 * scale, layout


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_orpo_trainer_encoder_decoder_parity(model_type, tmp_path, report):
    """ORPOTrainer encoder–decoder: its NLL is the chosen labels' batch token-mean (no prompt tokens
    here); preftune's default NLL is the paper's per-sequence mean, and the documented escape hatch
    (nll_logps / nll_lengths = chosen sums / lengths) gives TRL's loss exactly."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok, base = _trl_model(model_type)
    args = ORPOConfig(**H.trl_common_args(tmp_path), max_length=1024, max_completion_length=256, beta=0.1)
    trainer = ORPOTrainer(model=H.clone(base), args=args, train_dataset=short_dataset(), processing_class=tok)
    batch = H.first_batch(trainer)
    with torch.no_grad():
        trl_loss, trl_metrics = H.trl_step(trainer, batch)
    pairs = pairs_from_seq2seq_batch(batch)
    ours = H.clone(base)
    keys = H.COMPARED + ("log_odds_ratio", "log_odds_chosen")
    for layout, laid in layouts(ours, pairs):
        with torch.no_grad():
            logps = sequence_logps(ours, laid, chunk_size=32)
        out = compute_loss(logps, LossArguments(loss="orpo", beta=0.1))
        metrics = out.metrics  # TRL's names (rewards/*, logps/*)
        for k in keys:
            _note(report, f"orpo {model_type}", "metrics", abs(float(metrics[k]) - trl_metrics[k]))
            assert abs(float(metrics[k]) - trl_metrics[k]) <= TOL, (layout, k)
        trl_style = orpo_loss(logps, beta=0.1, nll_logps=logps.chosen_logps, nll_lengths=logps.chosen_lengths)
        _note(report, f"orpo {model_type}", "loss", abs(float(trl_style.losses.mean()) - float(trl_loss)))
        assert abs(float(trl_style.losses.mean()) - float(trl_loss)) <= TOL, layout
        assert abs(float(trl_style.metrics["nll_loss"]) - trl_metrics["nll_loss"]) <= TOL, layout
        # the odds-ratio term alone is TRL's whatever the NLL convention
        or_term = float(out.losses.mean() - out.metrics["nll_loss"])
        assert abs(or_term - (float(trl_loss) - trl_metrics["nll_loss"])) <= TOL, layout


def test_trl_dpo_trainer_has_no_encoder_decoder_path(tmp_path):
    """TRL 1.16's DPOTrainer builds decoder-only rows (input_ids = prompt + completion) and calls the
    model without decoder inputs: a T5 fails. preftune's DPO on T5 is checked against the naive
    formula instead (test_dpo_against_naive_reference)."""
    from trl import DPOConfig, DPOTrainer

    tok, base = _trl_model("t5")
    args = DPOConfig(**H.trl_common_args(tmp_path), max_length=1024, precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=H.clone(base), ref_model=H.clone(base), args=args, train_dataset=short_dataset(),
                         processing_class=tok)
    batch = H.first_batch(trainer)
    assert "decoder_input_ids" not in batch and "labels" not in batch
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        H.trl_step(trainer, batch)


def test_dpo_against_naive_reference():
    """DPO (Rafailov et al. 2023, eq. 7) from naive log-probs of a policy and a reference T5."""
    import torch.nn.functional as F

    policy, ref = tiny("t5", seed=0), tiny("t5", seed=1)
    pairs = random_pairs()
    with torch.no_grad():
        pc, pr = naive_logps(policy, pairs)
        rc, rr = naive_logps(ref, pairs)
        expected = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
        for layout, batch in layouts(policy, pairs):
            logps = sequence_logps(policy, batch)
            r = sequence_logps(ref, batch)
            logps.ref_chosen_logps, logps.ref_rejected_logps = r.chosen_logps, r.rejected_logps
            loss = compute_loss(logps, LossArguments(loss="dpo", beta=0.1)).losses.mean()
            assert abs(float(loss) - float(expected)) <= TOL, layout


# ---------------------------------------------------------------------------------------------
# CLI: every loss, LoRA aliases, resume, generate, mt translate / build-triplets
# ---------------------------------------------------------------------------------------------

RECORDS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
            "rejected": f" Maybe {i + 7}, or {i}."} for i in range(8)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    out = {}
    for model_type in ("t5", "bart"):
        tok = seq2seq_tokenizer(TEMPLATES[model_type])
        d = tmp_path_factory.mktemp(f"tiny-{model_type}")
        tiny(model_type, vocab_size=len(tok)).save_pretrained(d)
        tok.save_pretrained(d)
        out[model_type] = str(d)
    data = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out["data"] = str(data)
    return out


def flags(model_dir, data, out, *extra):
    return ["--model_name_or_path", model_dir, "--dataset", data, "--output_dir", str(out), "--use_peft",
            "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--logging_steps", "1", "--learning_rate", "1e-2", "--max_length", "128", "--max_prompt_length", "64",
            "--seed", "3", "--save_strategy", "no", "--dataloader_num_workers", "0", *extra]


def history(out):
    return json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]


def test_tokenisation_keeps_the_seq2seq_special_tokens(model_dirs):
    from preftune.config import DataArguments, ModelArguments
    from preftune.data import build_datasets
    from preftune.models import load_model, load_tokenizer

    for model_type, first in (("t5", None), ("bart", 1)):
        args = ModelArguments(model_name_or_path=model_dirs[model_type])
        tok = load_tokenizer(args)
        model = load_model(args, training=False)
        options = kind_for(model).tokenize_options(model)
        assert options == {"keep_special_tokens": True}
        data = build_datasets(DataArguments(dataset=[model_dirs["data"]]), tok, seed=0, **options)
        assert len(data.train) == len(RECORDS)
        for pair in data.train:
            assert pair.prompt_ids[-1] == 2 and pair.chosen_ids[-1] == 2 and pair.chosen_ids.count(2) == 1
            assert (pair.chosen_ids[0] == 1) == (first == 1)  # BART: <s> text </s> as its tokenizer writes it
        expected = sorted((tok(r["prompt"])["input_ids"], tok(r["chosen"])["input_ids"], tok(r["rejected"])["input_ids"])
                          for r in RECORDS)
        assert sorted((p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in data.train) == expected


@pytest.mark.parametrize("model_type,loss", [("t5", "cpo"), ("t5", "simpo"), ("t5", "cpo-simpo"), ("t5", "orpo"),
                                             ("t5", "dpo"), ("t5", "sft"), ("bart", "cpo"), ("bart", "dpo")])
def test_every_loss_trains_through_the_cli(model_dirs, tmp_path, model_type, loss):
    from preftune.cli import main

    out = tmp_path / loss
    assert main(["train", *flags(model_dirs[model_type], model_dirs["data"], out, "--loss", loss,
                                 "--lora_target_modules", "DEFAULT")]) == 0
    logs = [h for h in history(out) if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert logs[0]["loss"] != logs[1]["loss"]
    assert "rewards/margins" in logs[0] and "logps/chosen" in logs[0]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM"
    assert sorted(adapter["target_modules"]) == (["q", "v"] if model_type == "t5" else ["q_proj", "v_proj"])
    if loss == "dpo":
        assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1


def test_resume_generate_and_reload(model_dirs, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from preftune.cli import main
    from preftune.generate import main as generate_main

    out = tmp_path / "run"
    base = flags(model_dirs["t5"], model_dirs["data"], out, "--save_strategy", "steps", "--save_steps", "1",
                 "--lora_target_modules", "ALL")
    assert main(["train", *base]) == 0
    assert (out / "checkpoint-2").is_dir()
    assert main(["train", *base[:base.index("--max_steps")], "--max_steps", "3",
                 *base[base.index("--max_steps") + 2:], "--resume_from_checkpoint", "latest"]) == 0
    steps = [h["step"] for h in history(out) if "loss" in h]
    assert steps[-1] == 3
    # the adapter reloads on the base model (all-linear: every linear layer but the head)
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(model_dirs["t5"]), str(out))
    assert any("EncDecAttention" in n and "lora_A" in n for n, _ in model.named_parameters())
    assert not any("lm_head.lora" in n for n, _ in model.named_parameters())
    capsys.readouterr()
    jsonl = tmp_path / "gen.jsonl"
    assert generate_main(["--model", model_dirs["t5"], "--adapter", str(out), "--dataset", model_dirs["data"],
                          "--num_prompts", "2", "--max_new_tokens", "4", "--output_jsonl", str(jsonl)]) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["base"], str) and isinstance(r["adapter"], str) for r in rows)
    assert not any(r["adapter"].startswith(r["prompt"][:10]) for r in rows)  # the prompt is not echoed


def test_mt_translate_and_build_triplets_with_t5(model_dirs, tmp_path):
    from preftune.mt import translate as tr
    from preftune.mt.cli import main as mt_main

    src = tmp_path / "test.de-en.json"
    sources = ["Guten Morgen.", "Wie geht es dir?", "Das ist ein Test."]
    src.write_text(json.dumps([{"translation": {"de": s, "en": f"ref {i}"}} for i, s in enumerate(sources)]))
    out = tmp_path / "out"
    assert mt_main(["translate", "--pair", "de-en", "--input", str(src), "--model", model_dirs["t5"], "--out_dir",
                    str(out), "--name", "t5", "--batch_size", "2", "--max_new_tokens", "5", "--no_progress"]) == 0
    lines = (out / "t5" / "deen" / "test.de-en.en").read_text().splitlines()
    assert len(lines) == 3
    model, tok = tr.load_translation_model(model_dirs["t5"])
    assert tok.padding_side == "right"
    from preftune.mt.prompts import generation_prompt

    prompts = [generation_prompt(tok, "de", "en", s, False) for s in sources]
    outs, _ = tr.generate(model, tok, prompts, max_new_tokens=5)
    # batched (padded) output = each prompt alone: the encoder padding does not leak
    alone = [tr.generate(model, tok, [p], max_new_tokens=5)[0][0] for p in prompts]
    assert [o[0] for o in outs] == [a[0] for a in alone]
    assert not any(o[0].startswith("Translate") for o in outs)
    cand, _ = tr.generate_candidates(model, tok, sources[:2], "de", "en", n=2, mode="beam", batch_size=2,
                                     max_new_tokens=4, progress=False)
    assert len(cand) == 2 and all(len(c) == 2 for c in cand)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the model type, before any data is tokenised
# ---------------------------------------------------------------------------------------------


def _save(model, tmp_path, name):
    from conftest import byte_tokenizer

    d = tmp_path / name
    model.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return str(d)


def _train_error(model_dir, tmp_path, capsys, *extra):
    from preftune.cli import main

    missing = tmp_path / "no-such-data.jsonl"  # a data error would name it: the model error must come first
    capsys.readouterr()  # (save_pretrained's progress bars)
    assert main(["train", "--model_name_or_path", model_dir, "--dataset", str(missing), "--output_dir",
                 str(tmp_path / "o"), "--max_steps", "1", *extra]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]  # (not the loading progress bars)
    assert "Traceback" not in err and len(lines) == 1 and "no-such-data" not in err, err
    return lines[0]


def test_unsupported_architectures_are_one_clear_error(tmp_path, capsys):
    from transformers import (
        BertConfig,
        BertModel,
        Gemma2Config,
        Gemma2ForCausalLM,
        LongT5Config,
        LongT5ForConditionalGeneration,
    )

    bert = _save(BertModel(BertConfig(vocab_size=259, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32)), tmp_path, "bert")
    err = _train_error(bert, tmp_path, capsys)
    assert "'bert'" in err and "encoder-only" in err and "Supported" in err
    gemma = _save(Gemma2ForCausalLM(Gemma2Config(vocab_size=259, hidden_size=32, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                 head_dim=16, final_logit_softcapping=30.0)), tmp_path, "gemma2")
    err = _train_error(gemma, tmp_path, capsys, "--attn_implementation", "eager")
    assert "'gemma2'" in err and "final_logit_softcapping" in err
    longt5 = _save(LongT5ForConditionalGeneration(LongT5Config(vocab_size=259, d_model=32, d_kv=8, d_ff=32,
                                                               num_layers=1, num_heads=2, decoder_start_token_id=0)),
                   tmp_path, "longt5")
    err = _train_error(longt5, tmp_path, capsys, "--attn_implementation", "eager")
    assert "'longt5'" in err and "t5" in err and "bart" in err


def test_seq2seq_reward_model_is_a_clear_error(model_dirs, tmp_path, capsys):
    err = _train_error(model_dirs["t5"], tmp_path, capsys, "--loss", "rm")
    assert "encoder–decoder" in err and "--loss rm" in err


def test_bart_is_no_longer_loaded_as_its_decoder_alone(model_dirs):
    from preftune.config import ModelArguments
    from preftune.models import load_model

    model = load_model(ModelArguments(model_name_or_path=model_dirs["bart"]))
    assert type(model).__name__ == "BartForConditionalGeneration" and kind_for(model).name == "seq2seq"
    with pytest.raises(UnsupportedModelError, match="encoder-only"):
        from transformers import BertConfig

        kind_for_config(BertConfig(), name="bert-dir")
