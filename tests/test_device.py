"""The device policy (issue 21): every device-dependent choice, each branch forced without a GPU."""

import numpy as np
import pytest
import torch

from preftune.device import CPU_ACTIVATION_BUDGET_GB, CUDA_ACTIVATION_SHARE, DevicePolicy
from preftune.errors import ConfigError

CPU = DevicePolicy(torch.device("cpu"))
H200 = DevicePolicy(torch.device("cuda", 0), bf16=True, free_memory_bytes=100 << 30, total_memory_bytes=141 << 30)
T4 = DevicePolicy(torch.device("cuda", 0), bf16=False, free_memory_bytes=8 << 30, total_memory_bytes=16 << 30)


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert DevicePolicy.of("auto") == DevicePolicy(torch.device("cpu"))
    assert DevicePolicy.of(None).device.type == "cpu"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        DevicePolicy.of("cuda")
    with pytest.raises(ConfigError, match="--device 'gpu0' is not valid"):
        DevicePolicy.of("gpu0")


def test_auto_is_the_local_rank_gpu_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (3 << 30, 16 << 30))
    monkeypatch.setenv("LOCAL_RANK", "1")
    policy = DevicePolicy.of("auto")
    assert policy == DevicePolicy(torch.device("cuda", 1), bf16=False, free_memory_bytes=3 << 30,
                                  total_memory_bytes=16 << 30)


@pytest.mark.parametrize("policy, expected", [(CPU, "float32"), (H200, "bfloat16"), (T4, "float16")])
def test_auto_dtype(policy, expected):
    assert policy.model_dtype("auto") == expected
    assert policy.model_dtype("float32") == "float32" and policy.model_dtype("bfloat16") == "bfloat16"


def test_numerics(monkeypatch):
    flushed = []
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: flushed.append(on) or True)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert CPU.configure_numerics(flush_denormal=True) and flushed == [True]
        assert not torch.backends.cuda.matmul.allow_tf32  # the CPU leaves TF32 alone
        assert CPU.configure_numerics(flush_denormal=False) == [] and flushed == [True]
        assert H200.configure_numerics(flush_denormal=True) == ["TF32 matmuls on"] and flushed == [True]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_memory_choices():
    assert CPU.trims_heap and not H200.trims_heap
    assert CPU.activation_budget_gb(None) == CPU_ACTIVATION_BUDGET_GB
    assert H200.activation_budget_gb(None) == pytest.approx(CUDA_ACTIVATION_SHARE * 100)
    assert T4.activation_budget_gb(None) == pytest.approx(CUDA_ACTIVATION_SHARE * 8)
    assert H200.activation_budget_gb(3.0) == 3.0 and CPU.activation_budget_gb(float("inf")) == float("inf")


def test_dropout_masks_where_the_tensor_is():
    x = torch.zeros(4)
    assert DevicePolicy.host_dropout_masks(x)
    assert not DevicePolicy.host_dropout_masks(torch.zeros(4, device="meta"))
    a = torch.rand(1000, generator=DevicePolicy.dropout_generator(x, 7))
    b = torch.rand(1000, generator=DevicePolicy.dropout_generator(x, 7))
    c = torch.rand(1000, generator=DevicePolicy.dropout_generator(x, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert np.isclose(float((a < 0.05).float().mean()), 0.05, atol=0.03)


def test_training_step_asks_the_policy(monkeypatch):
    """engine.memory: heap trimming only where the policy trims, the activation budget from the policy
    when none is given (a GPU: a share of its free memory), the element size of autocast's dtype."""
    from types import SimpleNamespace

    from preftune.engine import memory

    gpu = DevicePolicy(torch.device("cpu"), free_memory_bytes=10 << 30)  # answers as a GPU would, on the CPU
    monkeypatch.setattr(DevicePolicy, "trims_heap", property(lambda self: self is not gpu))
    monkeypatch.setattr(DevicePolicy, "activation_budget_gb",
                        lambda self, requested: requested if requested is not None else (5.0 if self is gpu else 2.0))
    seen = {}
    monkeypatch.setattr(memory, "install_malloc_trim", lambda model, enabled, threshold: seen.update(trim=enabled))
    monkeypatch.setattr(memory, "plan_checkpointing", lambda model, tokens, budget: seen.update(budget=budget))
    options = SimpleNamespace(malloc_trim=True, malloc_trim_threshold_mb=256.0, compile_layers=False,
                              max_activation_memory_gb=None)
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    model = torch.nn.Linear(2, 2)
    memory.prepare_training_step(model, batch, options)
    assert seen == {"trim": True, "budget": 2.0}  # the CPU
    model = torch.nn.Linear(2, 2)
    model._preftune_device_policy = gpu
    memory.prepare_training_step(model, batch, options)
    assert seen == {"trim": False, "budget": 5.0}
    options.max_activation_memory_gb = 1.5
    memory.prepare_training_step(model, batch, options)
    assert seen["budget"] == 1.5
    assert memory.activation_element_size(model) == 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert memory.activation_element_size(model) == 2
