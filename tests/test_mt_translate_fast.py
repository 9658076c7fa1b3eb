"""The greedy decoding loop of ``preftune mt translate`` (KV cache, finished rows replaced by waiting
prompts) against ``model.generate`` greedy, on a tiny random Llama with a byte tokenizer."""

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from preftune.mt import translate as tr

PROMPTS = [p + str(i) for i, p in enumerate(
    ["Hallo Welt", "a", "Guten Morgen, wie geht es?", "xyz 123", "Das ist ein ziemlich langer Satz mit Worten.",
     "q", "Bis morgen!", "12"] * 2)]
MAX_NEW = 24


@pytest.fixture(scope="module")
def tok():
    t = byte_tokenizer()
    t.padding_side = "left"
    return t


@pytest.fixture(scope="module")
def model(tok):
    """Seeded so that rows stop at EOS, at a newline after text, and run into ``MAX_NEW`` (checked
    in the tests); newline, EOS and space logits are scaled up to make stops likely."""
    m = tiny_llama(vocab_size=len(tok), seed=3)
    with torch.no_grad():
        m.lm_head.weight[tok.convert_tokens_to_ids("Ċ")] *= 6  # "\n"
        m.lm_head.weight[tok.eos_token_id] *= 5
        m.lm_head.weight[tok.convert_tokens_to_ids("Ġ")] *= 4  # " "
    return m


def reference(model, tok, prompts):
    """``model.generate`` greedy on one left-padded batch, the original stop check: new tokens per row."""
    from transformers import StoppingCriteriaList

    enc = tok(prompts, return_tensors="pt", padding=True)
    n = enc["input_ids"].shape[1]
    out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                         temperature=None, top_p=None, top_k=None,
                         stopping_criteria=StoppingCriteriaList([tr._StopAtNewline(tok, n)]))
    return out[:, n:].tolist()


def kind(tok, tokens):
    text = tok.decode(tokens, skip_special_tokens=True)
    return "newline" if tr._stops_at_newline(text) else "eos" if tok.eos_token_id in tokens else "max"


@pytest.mark.parametrize("batch_size,refill_at,spare", [(16, None, True), (5, None, True), (3, 1, True),
                                                        (4, 4, True), (5, None, False), (1, None, True)])
def test_greedy_loop_gives_generate_tokens(model, tok, batch_size, refill_at, spare):
    ref = reference(model, tok, PROMPTS)
    calls = []
    res = tr.greedy_continuous(model, tok, tok(PROMPTS)["input_ids"], batch_size=batch_size,
                               max_new_tokens=MAX_NEW, refill_at=refill_at, spare_columns=spare,
                               on_result=lambda i, t, trunc: calls.append(i))
    assert sorted(calls) == list(range(len(PROMPTS)))
    kinds = set()
    for row, (tokens, truncated) in zip(ref, res):
        # generate's row: the same tokens, then padding up to the longest row of the batch
        assert row[:len(tokens)] == tokens
        assert all(t == tok.pad_token_id for t in row[len(tokens):])
        k = kind(tok, tokens)
        kinds.add(k)
        assert truncated == (k == "max") and (len(tokens) == MAX_NEW or not truncated)
    assert kinds == {"newline", "eos", "max"}  # the seeded model covers every way a row stops
    # some row emits a newline before any text and goes on: a newline alone does not stop a row
    assert any(tok.decode(t, skip_special_tokens=True).startswith(("\n", " \n")) and len(t) > 2 for t, _ in res)


def test_generate_engines_agree(model, tok):
    legacy, trunc_legacy = tr.generate(model, tok, PROMPTS, max_new_tokens=MAX_NEW, engine="legacy")
    stop_ids, trunc_ids = tr.generate(model, tok, PROMPTS, max_new_tokens=MAX_NEW, engine="generate")
    seen = {}
    fast, trunc_fast = tr.generate(model, tok, PROMPTS, max_new_tokens=MAX_NEW, batch_size=5,
                                   on_result=lambda i, o, t: seen.setdefault(i, (o, t)))
    assert legacy == stop_ids == fast
    assert trunc_legacy == trunc_ids == trunc_fast > 0
    assert sorted(seen) == list(range(len(PROMPTS))) and sum(t for _, t in seen.values()) == trunc_fast
    assert all(seen[i][0] == fast[i] for i in seen)
    # model.generate batch after batch gives the same as one batch here too
    batched, trunc_batched = tr.generate(model, tok, PROMPTS, max_new_tokens=MAX_NEW, batch_size=5, engine="legacy")
    assert batched == legacy and trunc_batched == trunc_legacy


def test_logits_processor_falls_back_to_generate(tok):
    m = tiny_llama(vocab_size=len(tok), seed=3)
    assert tr.greedy_loop_supported(m)
    m.generation_config.repetition_penalty = 1.5
    assert not tr.greedy_loop_supported(m)
    auto, t_auto = tr.generate(m, tok, PROMPTS[:6], max_new_tokens=10, batch_size=4)
    legacy, t_legacy = tr.generate(m, tok, PROMPTS[:6], max_new_tokens=10, batch_size=4, engine="legacy")
    assert auto == legacy and t_auto == t_legacy
    m.generation_config.repetition_penalty = 1.0
    m.generation_config.suppress_tokens = [5]
    assert not tr.greedy_loop_supported(m)


def test_stop_criterion_token_ids_match_decoding(tok):
    """The newline-token prefilter gives the decode-everything check's answer on every row."""
    g = torch.Generator().manual_seed(0)
    alphabet = tok(["\n", " ", "\t", "a", "Z", "ä", "."], add_special_tokens=False)["input_ids"]
    pool = torch.tensor(sorted({i for ids in alphabet for i in ids} | {tok.eos_token_id, tok.pad_token_id}))
    rows = pool[torch.randint(len(pool), (400, 7), generator=g)]
    input_ids = torch.cat([torch.full((400, 3), 70), rows], dim=1)
    mask = tr.newline_token_mask(tok)
    assert mask.shape == (len(tok),) and mask.sum() == 1 and mask[tok.convert_tokens_to_ids("Ċ")]
    fast = tr._StopAtNewline(tok, 3, mask)(input_ids, None)
    slow = tr._StopAtNewline(tok, 3)(input_ids, None)
    assert torch.equal(fast, slow) and 0 < int(fast.sum()) < 400


def test_translate_to_file_same_lines(tok, tmp_path):
    model = tiny_llama(vocab_size=len(tok), seed=3)  # with ALMA's prompt: most rows truncated, some stop
    files, stats = {}, {}
    for engine in ("legacy", "auto"):
        f = tmp_path / engine / "out.en"
        stats[engine] = tr.translate_to_file(model, tok, PROMPTS, "de", "en", f, batch_size=3, sort_window=2,
                                             max_new_tokens=12, progress=False, engine=engine)
        files[engine] = f.read_text(encoding="utf-8")
        stats[engine].pop("file")
    assert files["auto"] == files["legacy"] and len(files["auto"].splitlines()) == len(PROMPTS)
    assert stats["auto"] == stats["legacy"]
    assert stats["auto"]["translated"] == len(PROMPTS) and 0 < stats["auto"]["truncated"] < len(PROMPTS)


def test_bad_arguments(model, tok):
    with pytest.raises(ValueError, match="engine"):
        tr.generate(model, tok, ["a"], engine="vllm")
    with pytest.raises(ValueError, match="batch_size"):
        tr.greedy_continuous(model, tok, [[5]], batch_size=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        tr.greedy_continuous(model, tok, [[5], []], batch_size=2, max_new_tokens=4)
    assert tr.generate(model, tok, [], max_new_tokens=4) == ([], 0)


def test_cli_engine_flag(tiny_model_dir, tmp_path):
    import json

    from preftune.mt.cli import main

    data = tmp_path / "test.de-en.json"
    data.write_text(json.dumps([{"translation": {"de": p, "en": "x"}} for p in PROMPTS[:7]]))
    lines = {}
    for engine in ("legacy", "auto"):
        args = ["translate", "--pair", "de-en", "--input", str(data), "--model", tiny_model_dir, "--out_dir",
                str(tmp_path / engine), "--name", "t", "--batch_size", "3", "--sort_window", "2",
                "--max_new_tokens", "6", "--no_progress", "--engine", engine]
        assert main(args) == 0
        lines[engine] = (tmp_path / engine / "t" / "deen" / "test.de-en.en").read_text().splitlines()
    assert lines["auto"] == lines["legacy"] and len(lines["auto"]) == 7
