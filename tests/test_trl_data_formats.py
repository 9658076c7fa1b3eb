"""The data formats a TRL 1.16 user brings, through preftune's normalise + tokenise and through TRL's own
data preparation (``DPOTrainer._prepare_dataset`` / ``RewardTrainer._prepare_dataset``, run on a stub
trainer), on a byte-level tokenizer with ChatML-style special tokens and a chat template of our own
(issue 22): implicit prompts, tool-call conversations (``tools``, ``tool_calls``, ``role: tool``),
per-row ``chat_template_kwargs``, pre-tokenised columns, and images with a text-only model.
"""

from __future__ import annotations

import json
import types

import pytest
from conftest import byte_tokenizer, tiny_llama

from preftune.config import DataArguments
from preftune.data import normalise, tokenize_records
from preftune.data.pipeline import records_to_raw
from preftune.errors import DataError

# A ChatML-like template: tools listed in a system turn, tool calls written out, `shout` (a per-row template
# variable) upper-cases the roles. The EOS (<|im_end|>) is the last thing of each turn, so no whitespace follows it.
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | map(attribute='function') | map(attribute='name') | "
    "join(', ') }}<|im_end|>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] | upper if shout else m['role'] }}\n"
    "{% for c in m.get('tool_calls') or [] %}<call>{{ c['function']['name'] }}"
    "({{ c['function']['arguments'] | tojson }})</call>{% endfor %}"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>{{ 'ASSISTANT' if shout else 'assistant' }}\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name}.", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}}}} for name in ("start_timer", "get_time")]


def chat_tokenizer(template: str = TEMPLATE):
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = template
    return tok


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def call(name, x):
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {"x": x}}}]}


def tool(name, text):
    return {"role": "tool", "name": name, "content": text}


@pytest.fixture(scope="module")
def trl_rows(tmp_path_factory):
    """``trl_rows(records, tok)``: TRL 1.16 DPOTrainer's tokenised rows of ``records`` (its own
    ``_prepare_dataset``: extract_prompt, EOS, tools / chat_template_kwargs, common-prefix split)."""
    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), max_length=None, report_to="none", bf16=False,
                     use_cpu=True)

    def rows(records, tok):
        data = records if isinstance(records, Dataset) else Dataset.from_list(records)
        out = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), data, tok, args, "train")
        return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in out]

    return rows


def preftune_rows(records, tok, **data_kwargs):
    data = normalise(records_to_raw(records, "train_dataset"), DataArguments(**data_kwargs))
    pairs, stats = tokenize_records(data.records, tok, DataArguments(**data_kwargs), locations=data.locations,
                                    source="train_dataset")
    return data, [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs], stats


# ------------------------------------------------------------------------------------------------
# 1. Implicit prompts without HH-RLHF's "\n\nAssistant:": TRL's split, TRL's token ids
# ------------------------------------------------------------------------------------------------
def test_implicit_prompt_texts_and_messages_tokenise_as_trl(trl_rows):
    tok = chat_tokenizer()
    texts = [{"chosen": "Beautiful is better than ugly.", "rejected": "Beautiful is better than the moon."},
             {"chosen": "Now is better than never.", "rejected": "Now is never better."},
             {"chosen": "Same", "rejected": "Same"}]
    data, ours, _ = preftune_rows(texts, tok)
    assert data.format == "implicit_prompt" and data.records[0]["prompt"] == "Beautiful is better than"
    assert ours == trl_rows(texts, tok)
    # message lists, tool-call trajectories included: the prompt is the shared leading messages
    head = [user("Set a timer.")]
    convs = [{"chosen": head + [bot("Done.")], "rejected": head + [bot("No.")]},
             {"chosen": head + [call("start_timer", 600), tool("start_timer", "600"), bot("Set for 10 min.")],
              "rejected": head + [call("start_timer", 10), tool("start_timer", "10"), bot("Set for 10 s.")]},
             {"chosen": head + [call("get_time", 1), tool("get_time", "06:22"), bot("It is 06:22.")],
              "rejected": head + [call("get_time", 1), tool("get_time", "06:22"), bot("Noon.")]}]
    data, ours, _ = preftune_rows(convs, tok)
    assert data.format == "implicit_prompt" and data.kind == "messages"
    assert [len(r["prompt"]) for r in data.records] == [1, 1, 3]  # the last pair shares its call and result
    assert ours == trl_rows(convs, tok)


# ------------------------------------------------------------------------------------------------
# 2. Tool-call conversations: tools column (list or JSON string), tool_calls, role "tool"
# ------------------------------------------------------------------------------------------------
def test_tool_call_conversations_render_with_tools_as_trl(trl_rows):
    from datasets import Dataset

    tok = chat_tokenizer()
    records = [{"prompt": [user("Set a timer for 10 minutes.")],
                "chosen": [call("start_timer", 600), tool("start_timer", "600"), bot("Timer set.")],
                "rejected": [call("start_timer", 10), tool("start_timer", "10"), bot("Timer set for 10 s.")],
                "tools": json.dumps(TOOLS)},  # a JSON string, as Hub datasets store it
               {"prompt": [user("Time in Tokyo?")], "chosen": [call("get_time", 9), tool("get_time", "06:22"),
                                                                 bot("06:22.")],
                "rejected": [bot("I cannot tell.")], "tools": json.dumps(TOOLS[1:])}]
    dataset = Dataset.from_list(records)  # union schema: every message gets tool_calls / name / content keys (None)
    data, ours, _ = preftune_rows(dataset, tok)
    assert data.format == "conversational" and data.records[0]["tools"] == TOOLS
    assert data.records[0]["chosen"][0]["content"] is None  # a tool-call message without content, kept as given
    assert ours == trl_rows(dataset, tok)
    prompt, chosen, _ = ours[0]
    assert tok.decode(prompt).startswith("<|im_start|>system\nTools: start_timer, get_time<|im_end|>")
    assert tok.decode(chosen) == ('<call>start_timer({"x": 600})</call><|im_end|><|im_start|>tool\n600<|im_end|>'
                                  "<|im_start|>assistant\nTimer set.<|im_end|>")
    # tools as a list of schemas: the same tokens
    assert preftune_rows([dict(records[0], tools=TOOLS)], tok)[1] == ours[:1]


@pytest.mark.parametrize("change, field, problem", [
    ({"tools": "not json"}, "tools", "expected a list of tool schemas"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs.add_generation_prompt",
     "set by preftune"),
    ({"chat_template_kwargs": ["shout"]}, "chat_template_kwargs", "expected an object"),
    ({"chosen": [tool("start_timer", "1"), bot("x")]}, r"chosen\[0\].role", "'tool': completions must be assistant"),
    ({"prompt": [{"role": "user", "content": "a", "tool_calls": [{"type": "function"}]}]}, r"prompt\[0\].tool_calls",
     "only assistant messages make them"),
    ({"chosen": [{"role": "assistant"}]}, r"chosen\[0\].content", "missing"),  # no content and no tool calls
])
def test_bad_tool_and_template_fields_name_the_field(change, field, problem):
    record = dict({"prompt": [user("q")], "chosen": [bot("a")], "rejected": [bot("b")]}, **change)
    with pytest.raises(DataError, match=rf"^train_dataset, record 1, field '{field}': .*{problem}"):
        normalise(records_to_raw([record], "train_dataset"), DataArguments())


def test_empty_tool_result_and_empty_template_fields():
    record = {"prompt": [user("q")], "chosen": [call("get_time", 1), tool("get_time", ""), bot("a")],
              "rejected": [bot("b")], "tools": "[]", "chat_template_kwargs": {}}
    data = normalise(records_to_raw([record], "train_dataset"), DataArguments())
    assert data.records[0]["chosen"][1]["content"] == ""  # a tool may return nothing
    assert "tools" not in data.records[0] and "chat_template_kwargs" not in data.records[0]  # empty: as absent


# ------------------------------------------------------------------------------------------------
# 3. Per-row chat_template_kwargs
# ------------------------------------------------------------------------------------------------
def test_per_row_chat_template_kwargs_as_trl(trl_rows):
    tok = chat_tokenizer()
    records = [{"prompt": [user(f"What is better than ugly {i}?")], "chosen": [bot("Beautiful.")],
                "rejected": [bot("Acceptable.")], "chat_template_kwargs": {"shout": bool(i % 2)}} for i in range(2)]
    _, ours, _ = preftune_rows(records, tok)
    assert ours == trl_rows(records, tok)
    assert tok.decode(ours[0][0]).startswith("<|im_start|>user\n") and tok.decode(ours[1][0]).startswith(
        "<|im_start|>USER\n")
    # text records have no chat template: the keywords are not used, and the report says so
    data, _, _ = preftune_rows([{"prompt": "Q", "chosen": " a", "rejected": " b", "chat_template_kwargs": {"shout": 1}}],
                               tok)
    assert "1 text records with tools / chat_template_kwargs" in data.describe()


def test_prompt_rendered_differently_alone_is_cut_where_trl_cuts(trl_rows, caplog):
    """A generation prompt the full conversation does not repeat (an empty thought block): TRL takes the common
    token prefix as the prompt; preftune the common text, with a warning naming the count."""
    generation = "{% if add_generation_prompt %}<|im_start|>{{ 'ASSISTANT' if shout else 'assistant' }}\n{% endif %}"
    assert generation in TEMPLATE
    template = TEMPLATE.replace(generation, "{% if add_generation_prompt %}<|im_start|>assistant\n<think></think>"
                                            "{% endif %}")
    tok = chat_tokenizer(template)
    records = [{"prompt": [user("Hi")], "chosen": [bot("Hello.")], "rejected": [bot("Bye.")]}]
    with caplog.at_level("WARNING", logger="preftune.data"):
        _, ours, _ = preftune_rows(records, tok)
    assert ours == trl_rows(records, tok)
    assert tok.decode(ours[0][0]).endswith("<|im_start|>assistant\n")
    assert "renders the prompt alone differently" in caplog.text and "in 1 of 1 records" in caplog.text


def test_prompt_cut_never_splits_a_special_token_text():
    from preftune.data.render import _token_boundary

    added = ["<|im_start|>", "<|im_end|>"]
    assert _token_boundary(len("ab<|im_"), ["ab<|im_start|>", "ab<|im_end|>x"], added) == 2
    assert _token_boundary(5, ["ab<|im_start|>x"], added) == 2
    assert _token_boundary(2, ["ab<|im_start|>", "abc"], added) == 2  # already at a boundary


# ------------------------------------------------------------------------------------------------
# 4. Pre-tokenised columns: used as given, truncation applied and counted
# ------------------------------------------------------------------------------------------------
def test_pretokenized_dpo_rows_are_used_as_given():
    tok = chat_tokenizer()
    rows = [{"prompt_ids": [1, 40, 41], "chosen_ids": [50, 51, 52], "rejected_ids": [60, 2]},
            {"prompt_ids": [1, 40], "chosen_ids": [50], "rejected_ids": [50]}]  # identical: counted
    data, ours, stats = preftune_rows(rows, tok)
    assert data.format == "pretokenized" and data.kind == "tokens" and data.identical == 1
    assert ours == [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows]  # no EOS added
    assert stats.identical == 1
    # truncation: TRL's order (completions, then the prompt, then the completions to fit), every cut counted
    _, cut, stats = preftune_rows(rows[:1], tok, max_length=4, max_prompt_length=2, truncation_mode="keep_end")
    assert cut == [([1, 41], [50, 51], [60, 2])]  # keep_end keeps the leading BOS
    assert stats.prompts_truncated == 1 and stats.completions_truncated == 1
    _, kept, stats = preftune_rows(rows[:1], tok, max_length=3, max_prompt_length=None)
    assert kept == [] and stats.dropped["prompt fills max_length"] == 1


def test_pretokenized_reward_columns_match_trl_reward_trainer(tmp_path):
    """TRL's RewardTrainer reads whole sequences (chosen_ids / rejected_ids, or the older *_input_ids): preftune
    splits them at their shared leading tokens; prompt + completion is TRL's sequence, token for token."""
    from datasets import Dataset
    from trl import RewardConfig
    from trl.trainer.reward_trainer import RewardTrainer

    tok = chat_tokenizer()
    pairs = [("Beautiful is better than ugly.", "Beautiful is better than the moon."),
             ("Now is better than never.", "Now is never better.")]
    for chosen_key, rejected_key in (("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids")):
        rows = [{chosen_key: tok(c)["input_ids"], rejected_key: tok(r)["input_ids"], "chosen": c} for c, r in pairs]
        with pytest.warns(FutureWarning, match="will not be supported in v1") if chosen_key == "chosen_input_ids" \
                else _nothing():  # TRL's deprecation warning for the older columns, as TRL's own test expects
            data, ours, _ = preftune_rows(rows, tok)
        assert data.format == "pretokenized" and "2 records also hold text fields" in data.describe()
        args = RewardConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, max_length=None)
        with pytest.warns(FutureWarning) if chosen_key == "chosen_input_ids" else _nothing():
            theirs = RewardTrainer._prepare_dataset(None, Dataset.from_list(rows), tok, args, "train")
        assert [(p + c, p + r) for p, c, r in ours] == [(t["chosen_ids"], t["rejected_ids"]) for t in theirs]
        assert tok.decode(ours[0][0]) == "Beautiful is better than "
    # older CPO / ORPO rows: prompt_input_ids at the start of both whole sequences
    row = {"prompt_input_ids": [40, 41], "chosen_input_ids": [40, 41, 50], "rejected_input_ids": [40, 41, 60, 61]}
    assert preftune_rows([row], tok)[1] == [([40, 41], [50], [60, 61])]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("row, field, problem", [
    ({"chosen_ids": [5, 6], "rejected_ids": [7, 6]}, "chosen_ids", "no prompt tokens"),
    ({"prompt_ids": [1], "chosen_ids": [5, "a"], "rejected_ids": [7]}, r"chosen_ids\[1\]", "expected a token id"),
    ({"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [7]}, "chosen_ids", "empty"),
    ({"prompt_input_ids": [1, 2], "chosen_input_ids": [1, 3, 4], "rejected_input_ids": [1, 2, 5]}, "chosen_input_ids",
     "does not start with prompt_input_ids"),
])
def test_bad_pretokenized_rows_name_the_field(row, field, problem):
    with pytest.raises(DataError, match=rf"^train_dataset, record 1, field '{field}': .*{problem}"):
        normalise(records_to_raw([row], "train_dataset"), DataArguments())


def test_pretokenized_ids_outside_the_vocabulary_are_refused():
    tok = chat_tokenizer()
    with pytest.raises(DataError, match=rf"^train_dataset, record 1, field 'rejected_ids\[1\]': token id {len(tok)} is "
                                        "outside the tokenizer's vocabulary"):
        preftune_rows([{"prompt_ids": [1], "chosen_ids": [5], "rejected_ids": [7, len(tok)]}], tok)


def test_reward_trainer_trains_on_pretokenized_rows(tmp_path):
    from datasets import Dataset

    from preftune.trl import RewardConfig, RewardTrainer

    tok = chat_tokenizer()
    model = tiny_llama(vocab_size=len(tok), layers=1)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"chosen_ids": tok(f"Item {i} is blue.")["input_ids"], "rejected_ids": tok(f"Item {i} is no.")["input_ids"]}
            for i in range(4)]
    args = RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=1, per_device_train_batch_size=2,
                        save_strategy="no", report_to="none", logging_steps=1)
    trainer = RewardTrainer(model=str(tmp_path / "model"), args=args, train_dataset=Dataset.from_list(rows))
    assert "format pretokenized" in trainer.data_report
    trainer.train()
    assert trainer.state.global_step == 1


# ------------------------------------------------------------------------------------------------
# 5. Images with a text-only model: an error (a ValueError, with TRL's words), never a silent drop
# ------------------------------------------------------------------------------------------------
def test_trl_image_column_with_a_text_only_model_raises(tmp_path):
    import numpy as np
    from datasets import Dataset, Image

    from preftune.trl import DPOConfig, DPOTrainer

    records = [{"prompt": [user("What is in the picture?")], "chosen": [bot("A cat.")], "rejected": [bot("A dog.")],
                "image": np.zeros((8, 8, 3), dtype=np.uint8)} for _ in range(2)]
    dataset = Dataset.from_list(records).cast_column("image", Image())  # TRL's zen-image: one embedded image a row
    with pytest.raises(DataError, match=r"^train_dataset, record 1, field 'image\[0\]': embedded image data"):
        normalise(records_to_raw(dataset, "train_dataset"), DataArguments())
    tok = chat_tokenizer()
    args = DPOConfig(output_dir=str(tmp_path / "o"), max_steps=1, report_to="none")
    with pytest.raises(ValueError, match="vision-related.*vision-language model"):  # TRL's own test's pattern
        DPOTrainer(tiny_llama(vocab_size=len(tok), layers=1), args=args, train_dataset=dataset, processing_class=tok)
    # an image file by path (the 'image' column read as 'images'): refused at tokenisation by the text-only tokenizer
    (tmp_path / "a.png").write_bytes(b"x")
    data = normalise(records_to_raw([dict(records[0], image=str(tmp_path / "a.png"))], "train_dataset"),
                     DataArguments())
    assert data.records[0]["images"] == [str((tmp_path / "a.png").resolve())]
    with pytest.raises(DataError, match=r"field 'images': 1 image\(s\) given, but .* text-only .*vision-related: use "
                                        "a vision-language model"):
        tokenize_records(data.records, tok, DataArguments(), locations=data.locations, source="train_dataset")
