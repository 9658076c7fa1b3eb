"""One special-token rule, checked against TRL 1.16 on every tokenizer kind (issue 22).

Tiny word-level tokenizers (tokenizers' ``WordLevel`` + whitespace pre-tokenizer) of five kinds:
BOS added (``<s> $A``), BOS and EOS added (``<s> $A </s>``, BART-like), EOS added (``$A </s>``,
T5-like), a BOS defined but not added (no post-processor), no BOS at all. preftune's rule
(``src/preftune/data/tokenize.py``, ``docs/python-api.md`` "Special tokens"):

* decoder-only: the prompt carries a BOS exactly where the tokenizer adds one; each completion ends with
  one EOS. Equal to TRL's ``DPOTrainer`` except where the tokenizer itself appends an EOS (TRL appends
  the EOS text and the tokenizer adds another: two EOS); equal to TRL's CPO / ORPO trainers except where
  a BOS is defined but not added (TRL prepends it).
* encoder–decoder: prompt and completions exactly as the tokenizer encodes them (TRL's CPO / ORPO; TRL's
  ``DPOTrainer`` has no encoder–decoder path).

The first training step through ``preftune.trl`` equals TRL's (≤ 1e-5) on tiny T5, BART, Mixtral and
Llama models, and ``preftune train`` gives the same first step as ``preftune.trl`` (dropout disabled in
both by default, ``--disable_dropout``).
"""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch

from preftune.config import DataArguments
from preftune.data.tokenize import tokenize_records

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2
WORDS = "what is two plus three five six the sky blue red green answer four it maybe question yes no".split()
TEMPLATES = {"bos": "<s> $A", "bos_eos": "<s> $A </s>", "eos": "$A </s>", "bos_not_added": None, "no_bos": None}
KINDS = list(TEMPLATES)
# every completion starts with a space: nothing merges across the prompt / completion boundary
RECORDS = [{"prompt": "what is two plus three", "chosen": " five", "rejected": " six"},
           {"prompt": "the sky is", "chosen": " blue", "rejected": " red green"},
           {"prompt": "what is the answer", "chosen": " four it is", "rejected": " maybe"},
           {"prompt": "question", "chosen": " yes", "rejected": " no no"}]
TOL = 1e-5


def word_tokenizer(kind: str):
    """A word-level tokenizer of ``kind`` (see the module docstring): <pad> 0, <s> 1, </s> 2, <unk> 3."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if TEMPLATES[kind]:
        backend.post_processor = processors.TemplateProcessing(
            single=TEMPLATES[kind], special_tokens=[("<s>", BOS), ("</s>", EOS)])
    names = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if kind != "no_bos":
        names["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **names)


def ours(tok, seq2seq: bool, records=RECORDS, **data):
    pairs, stats = tokenize_records(records, tok, DataArguments(**{"max_length": 512, "max_prompt_length": None,
                                                                    **data}), keep_special_tokens=seq2seq)
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs], stats


def trl_rows(trainer: str, tok, seq2seq: bool):
    """TRL's ``tokenize_row`` of the CPO or ORPO trainer (its own code, on a bare instance)."""
    if trainer == "cpo":
        from trl.experimental.cpo import CPOTrainer as cls
    else:
        from trl.experimental.orpo import ORPOTrainer as cls
    self = object.__new__(cls)
    self.processing_class, self.is_encoder_decoder, self.max_length, self.max_completion_length = tok, seq2seq, 512, 128
    rows = []
    for record in RECORDS:
        row = cls.tokenize_row(self, dict(record))
        if seq2seq:
            rows.append((row["prompt_input_ids"], row["chosen_labels"], row["rejected_labels"]))
        else:
            n = len(row["prompt_input_ids"])
            rows.append((row["prompt_input_ids"], row["chosen_input_ids"][n:], row["rejected_input_ids"][n:]))
    return rows


def trl_dpo_rows(tok):
    """TRL ``DPOTrainer._prepare_dataset`` (its own code, on a bare instance): prompt / chosen / rejected ids."""
    from datasets import Dataset
    from trl import DPOTrainer

    self = object.__new__(DPOTrainer)
    self._tokenizer = tok
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=512, truncation_mode="keep_start")
    data = DPOTrainer._prepare_dataset(self, Dataset.from_list(RECORDS), tok, args, "train")
    return [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in data]


# ------------------------------------------------------------------------------------------------
# The rule, token by token, against TRL's own tokenisation code
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("trainer", ["cpo", "orpo"])
def test_decoder_only_equals_trl_cpo_orpo_except_a_bos_the_tokenizer_does_not_add(kind, trainer):
    tok = word_tokenizer(kind)
    mine, trl = ours(tok, False)[0], trl_rows(trainer, tok, False)
    assert all(c[-1:] == [EOS] and c.count(EOS) == 1 for _, *cs in mine for c in cs)  # one EOS per completion
    if kind in ("eos", "bos_not_added"):  # BOS defined, not added: TRL prepends it, preftune does not
        assert all(p[:1] != [BOS] for p, _, _ in mine)
        assert trl == [([BOS] + p, c, r) for p, c, r in mine]
    else:
        assert mine == trl
        assert all((p[:1] == [BOS]) == (kind != "no_bos") for p, _, _ in mine)


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_only_equals_trl_dpo_except_an_eos_the_tokenizer_appends(kind):
    tok = word_tokenizer(kind)
    mine, trl = ours(tok, False)[0], trl_dpo_rows(tok)
    if kind in ("bos_eos", "eos"):  # TRL: the EOS text appended, then the tokenizer's EOS: two
        assert trl == [(p, c + [EOS], r + [EOS]) for p, c, r in mine]
    else:
        assert mine == trl


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("trainer", ["cpo", "orpo"])
def test_encoder_decoder_equals_trl_on_every_tokenizer(kind, trainer):
    tok = word_tokenizer(kind)
    mine = ours(tok, True)[0]
    assert mine == trl_rows(trainer, tok, True)
    # as the tokenizer encodes each text, nothing added: an EOS only where the tokenizer appends one
    assert all((c[-1:] == [EOS]) == (kind in ("bos_eos", "eos")) for _, *cs in mine for c in cs)
    assert all((p[:1] == [BOS]) == (kind in ("bos", "bos_eos")) for p, _, _ in mine)


def test_an_encoder_decoder_completion_that_encodes_to_nothing_is_dropped_and_counted():
    """Without an EOS the tokenizer appends, an empty completion has no token to score: the pair is dropped
    (counted in the report), never scored as an empty sum."""
    records = RECORDS[:2] + [{"prompt": "the sky is", "chosen": " ", "rejected": " red"}]
    pairs, stats = ours(word_tokenizer("bos_not_added"), True, records)
    assert len(pairs) == 2 and stats.dropped == {"empty completion": 1} and "1 dropped" in stats.summary()
    pairs, stats = ours(word_tokenizer("eos"), True, records)  # with the tokenizer's EOS it is scored
    assert len(pairs) == 3 and pairs[2][1] == [EOS]


def test_a_prompt_budget_of_max_length_counts_the_cut_and_drops_a_pair_left_without_completion():
    """max_prompt_length == max_length (older TRL scripts): a prompt that fills max_length is cut, counted,
    and its pair dropped and counted; the others are kept whole."""
    records = RECORDS + [{"prompt": "what is two plus three " * 3, "chosen": " five", "rejected": " six"}]
    pairs, stats = ours(word_tokenizer("bos"), False, records, max_length=8, max_prompt_length=8)
    assert len(pairs) == 4 and stats.prompts_truncated == 1 and stats.dropped == {"prompt fills max_length": 1}
    assert all(len(p) + max(len(c), len(r)) <= 8 for p, c, r in pairs)
    assert "1 prompts truncated" in stats.summary() and "1 dropped" in stats.summary()


# ------------------------------------------------------------------------------------------------
# The first training step: preftune.trl against TRL, and the CLI against preftune.trl
# ------------------------------------------------------------------------------------------------
def tiny_model(model_type: str, tok, dropout: float = 0.0):
    """A tiny random model of ``model_type`` over ``tok``'s vocabulary (pad 0, bos 1, eos 2)."""
    import transformers as tf

    torch.manual_seed(0)
    ids = dict(vocab_size=len(tok), pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, initializer_range=0.2, **ids)
    if model_type == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**decoder))
    if model_type == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **decoder))
    if model_type == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, dropout_rate=dropout, decoder_start_token_id=PAD,
            initializer_factor=0.3, **ids))
    return tf.BartForConditionalGeneration(tf.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=dropout,
        decoder_start_token_id=EOS, init_std=0.2, **ids))


STEP = dict(report_to="none", use_cpu=True, bf16=False, fp16=False, per_device_train_batch_size=4, max_steps=1,
            logging_steps=1, learning_rate=1e-6, save_strategy="no", seed=0, dataloader_num_workers=0)


def first_step(package, trainer: str, model, tok, out) -> dict:
    """The first logged step of ``package``'s trainer (one batch holds all four pairs)."""
    from datasets import Dataset

    if package == "trl":
        import trl
        from trl.experimental import cpo, orpo

        config, cls = {"dpo": (trl.DPOConfig, trl.DPOTrainer), "cpo": (cpo.CPOConfig, cpo.CPOTrainer),
                       "orpo": (orpo.ORPOConfig, orpo.ORPOTrainer)}[trainer]
        extra = dict(gradient_checkpointing=False)
        if trainer != "dpo" and model.config.is_encoder_decoder:
            extra["max_completion_length"] = 32
    else:
        from preftune import trl as pt

        config, cls = {"dpo": (pt.DPOConfig, pt.DPOTrainer), "cpo": (pt.CPOConfig, pt.CPOTrainer),
                       "orpo": (pt.ORPOConfig, pt.ORPOTrainer)}[trainer]
        extra = {}
    args = config(output_dir=str(out), max_length=64, **STEP, **extra)
    refs = {"ref_model": copy.deepcopy(model)} if trainer == "dpo" else {}
    run = cls(model=model, args=args, train_dataset=Dataset.from_list(RECORDS), processing_class=tok, **refs)
    run.train()
    return run.state.log_history[0]


@pytest.mark.parametrize("trainer,model_type,kind", [
    ("cpo", "t5", "bos_not_added"),  # the case: T5 logps/chosen -18.87 vs -14.90 before
    ("orpo", "bart", "bos_eos"),
    ("cpo", "mixtral", "bos"),
    ("dpo", "llama", "bos_not_added"),
])
def test_first_step_through_preftune_trl_equals_trl(trainer, model_type, kind, tmp_path):
    tok = word_tokenizer(kind)
    model = tiny_model(model_type, tok)
    want = first_step("trl", trainer, copy.deepcopy(model), tok, tmp_path / "trl")
    got = first_step("preftune", trainer, model, tok, tmp_path / "preftune")
    keys = ["logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"]
    if trainer == "orpo":  # the odds-ratio part; the NLL differs on purpose (docs/python-api.md, docs/parity.md)
        keys += ["log_odds_ratio", "log_odds_chosen"]
        got["loss"], want["loss"] = got["loss"] - got["nll_loss"], want["loss"] - want["nll_loss"]
    for key in ["loss", *keys]:
        assert got[key] == pytest.approx(want[key], abs=TOL), (key, got[key], want[key])


def test_the_cli_and_preftune_trl_give_the_same_first_step_with_dropout_disabled(tmp_path):
    """T5 with dropout_rate 0.1: ``preftune train`` disables dropout by default as ``preftune.trl`` does
    (TRL's ``disable_dropout``), so both doors log the same first loss; ``--disable_dropout false`` keeps it."""
    from datasets import Dataset

    from preftune.cli import main
    from preftune.trl import CPOConfig, CPOTrainer

    tok = word_tokenizer("eos")
    tiny_model("t5", tok, dropout=0.1).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    common = dict(max_steps=1, per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to="none")

    def cli(out, *extra):
        flags = [x for k, v in common.items() for x in (f"--{k}", str(v))]
        assert main(["train", "--model_name_or_path", str(tmp_path / "model"), "--dataset", str(data),
                     "--output_dir", str(tmp_path / out), *flags, *extra]) == 0
        return json.loads((tmp_path / out / "trainer_state.json").read_text())["log_history"][0]["loss"]

    api = CPOTrainer(model=str(tmp_path / "model"), args=CPOConfig(output_dir=str(tmp_path / "api"), **common),
                     train_dataset=Dataset.from_list(RECORDS), processing_class=tok)
    api.train()
    assert cli("cli") == pytest.approx(api.state.log_history[0]["loss"], abs=TOL)
    assert abs(cli("cli-dropout", "--disable_dropout", "false") - api.state.log_history[0]["loss"]) > 1e-3
