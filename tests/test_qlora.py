"""QLoRA (models/quant.py): 4-bit NF4 and 8-bit bitsandbytes base weights with LoRA on top, on CPU.

Tolerances (measured on this tiny random Llama, float32, 4 pairs): the quantised model's per-token
log-probs differ from the unquantised model's by a mean of ~0.06 nats (4-bit NF4 + double
quantisation) and ~0.007 nats (8-bit LLM.int8()), against ~6 nats per token; the tests allow 0.15 and
0.03. Within one quantised model every layout gives the same log-probs (1e-4).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import trl_helpers as H

from preftune.config import ConfigError, PeftArguments
from preftune.engine.logprobs import sequence_logps
from preftune.types import TokenizedPair

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                reason="bitsandbytes not installed (pip install -e '.[qlora]')")

MEAN_TOL = {4: 0.15, 8: 0.03}  # nats per token, quantised vs unquantised (see the module docstring)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (hidden 64) with the byte tokenizer, saved as safetensors."""
    from conftest import byte_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    d = tmp_path_factory.mktemp("tiny-llama-q")
    LlamaForCausalLM(config).save_pretrained(d)
    tok.save_pretrained(d)
    records = [{"prompt": f"Q{i}: {i} + {i} =", "chosen": f" {2 * i}", "rejected": f" {i + 5}?"} for i in range(8)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(d)


def pairs(n: int = 4) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(1)

    def ids(k):
        return torch.randint(3, 259, (k,), generator=g).tolist()

    return [TokenizedPair(ids(8 + i), ids(5 + i), ids(3 + 2 * i)) for i in range(n)]


def load(model_dir, bits=None, adapter=None):
    from peft import PeftModel

    from preftune.config import ModelArguments
    from preftune.models import load_model

    quant = PeftArguments(load_in_4bit=bits == 4, load_in_8bit=bits == 8) if bits else None
    model = load_model(ModelArguments(model_name_or_path=model_dir), training=False, quantization=quant)
    return PeftModel.from_pretrained(model, adapter) if adapter else model


def per_token_gap(a, b, ps) -> float:
    n = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in ps)
    return float(((a.chosen_logps - b.chosen_logps).abs().sum() + (a.rejected_logps - b.rejected_logps).abs().sum()) / n)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_engine_every_layout_and_tolerance(model_dir, bits):
    import bitsandbytes as bnb

    dense, quant = load(model_dir), load(model_dir, bits)
    layer = quant.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    assert type(quant.lm_head) is torch.nn.Linear  # the head stays dense: the chunked LM head as usual
    if bits == 4:
        qs = layer.weight.quant_state
        assert qs.quant_type == "nf4" and qs.nested  # NF4 with double quantisation
    ps = pairs()
    with torch.no_grad():
        ref = sequence_logps(dense, H.layout(ps, share_prompt=False, padding_free=False))
        outs = [sequence_logps(quant, H.layout(ps, share_prompt=sp, padding_free=pf), chunk_size=7)
                for sp, pf in H.LAYOUTS]
    for out in outs[1:]:  # shared prompt, packing and the chunked head agree on quantised weights
        assert torch.allclose(out.chosen_logps, outs[0].chosen_logps, atol=1e-4)
        assert torch.allclose(out.rejected_logps, outs[0].rejected_logps, atol=1e-4)
    gap = per_token_gap(outs[0], ref, ps)
    assert 0 < gap <= MEAN_TOL[bits], gap  # quantised (not identical), within the documented tolerance


def _train(model_dir, out, bits, loss):
    from preftune.cli import main

    flag = "--load_in_4bit" if bits == 4 else "--load_in_8bit"
    argv = ["train", "--model_name_or_path", model_dir, "--dataset", str(Path(model_dir) / "pairs.jsonl"),
            "--output_dir", str(out), flag, "true", "--loss", loss,
            "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--logging_steps", "1", "--learning_rate", "5e-2", "--max_length", "128", "--max_prompt_length", "64",
            "--seed", "3", "--save_strategy", "no", "--dataloader_num_workers", "0"]
    assert main(argv) == 0
    return [h for h in json.loads((Path(out) / "trainer_state.json").read_text())["log_history"] if "loss" in h]


@pytest.mark.parametrize("bits,loss", [(4, "cpo"), (4, "dpo"), (8, "cpo"), (8, "dpo")])
def test_two_steps_then_reload_on_the_unquantised_base(model_dir, tmp_path, bits, loss):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    logs = _train(model_dir, out, bits, loss)
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert logs[0]["loss"] != logs[1]["loss"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # the adapter trained
    assert all(v.dtype == torch.float32 for v in weights.values())  # dense adapter weights, no packed ones
    ps = pairs()
    with torch.no_grad():
        dense = sequence_logps(load(model_dir, adapter=str(out)), H.layout(ps, share_prompt=True, padding_free=True))
        quant = sequence_logps(load(model_dir, bits, adapter=str(out)), H.layout(ps, share_prompt=True,
                                                                              padding_free=True))
        base = sequence_logps(load(model_dir), H.layout(ps, share_prompt=True, padding_free=True))
    assert per_token_gap(dense, quant, ps) <= MEAN_TOL[bits]
    assert per_token_gap(dense, base, ps) > 0  # the reloaded adapter changes the dense model


def test_quantisation_flags_and_cache_key(model_dir):
    from preftune.config import ModelArguments
    from preftune.run_setup import model_identity

    with pytest.raises(ConfigError, match="exclude each other"):
        PeftArguments(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ConfigError, match="bnb_4bit_quant_type"):
        PeftArguments(load_in_4bit=True, bnb_4bit_quant_type="int4")
    assert PeftArguments(load_in_8bit=True).use_peft and PeftArguments(load_in_4bit=True).use_peft
    args = ModelArguments(model_name_or_path=model_dir)
    keys = {model_identity(args, p) for p in (PeftArguments(), PeftArguments(load_in_4bit=True),
                                              PeftArguments(load_in_4bit=True, use_bnb_nested_quant=False),
                                              PeftArguments(load_in_8bit=True))}
    assert len(keys) == 4  # a quantised reference policy never reuses another's cached log-probs
    assert model_identity(args, PeftArguments()).endswith("amp=none")  # unquantised keys unchanged


def test_cpu_weight_packing_kept_off_where_it_breaks(model_dir):
    """bitsandbytes repacks a 4-bit weight in place in an eval forward on AVX512-BF16 CPUs: off for a
    training model (every layer), and for an inference model where the shape cannot be packed."""
    from bitsandbytes.nn import Linear4bit

    from preftune.config import ModelArguments
    from preftune.models import load_model
    from preftune.models.quant import limit_cpu_weight_packing

    model = load_model(ModelArguments(model_name_or_path=model_dir), training=True,
                       quantization=PeftArguments(load_in_4bit=True))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    for m in layers:  # as on an AVX512-BF16 CPU
        m.support_avx512bf16_for_cpu = True
    # hidden 64, MLP 128, k/v 32: in_features are multiples of the 64-wide block, out_features of 32
    assert limit_cpu_weight_packing(model, training=False) == 0
    narrow = next(m for m in layers if m.out_features == 32)  # k_proj: 64 -> 32, packable
    narrow.in_features = 32  # as a layer narrower than one block
    assert limit_cpu_weight_packing(model, training=False) == 1 and not narrow.support_avx512bf16_for_cpu
    assert limit_cpu_weight_packing(model, training=True) == len(layers) - 1
    assert not any(m.support_avx512bf16_for_cpu for m in layers)


def test_qlora_with_weight_sharding_is_refused_in_one_line(monkeypatch):
    from types import SimpleNamespace

    import transformers.integrations

    from preftune.models import check_sharding

    plain = SimpleNamespace(fsdp="", deepspeed=None)
    check_sharding(PeftArguments(load_in_4bit=True), plain)  # DDP / one process: fine
    check_sharding(PeftArguments(), SimpleNamespace(fsdp="full_shard", deepspeed=None))  # no quantisation: fine
    with pytest.raises(ConfigError, match="--load_in_4bit with --fsdp is not supported"):
        check_sharding(PeftArguments(load_in_4bit=True), SimpleNamespace(fsdp="full_shard", deepspeed=None))
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ConfigError, match="--load_in_8bit with DeepSpeed ZeRO-3"):
        check_sharding(PeftArguments(load_in_8bit=True), SimpleNamespace(fsdp="", deepspeed="zero3.json"))
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: False)
    check_sharding(PeftArguments(load_in_8bit=True), SimpleNamespace(fsdp="", deepspeed="zero2.json"))
