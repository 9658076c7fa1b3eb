"""The device policy: every device-dependent choice of preftune, decided in one place.

The rest of preftune asks a :class:`DevicePolicy` instead of testing ``is_cuda`` itself:

* which device a command runs on (``--device auto``: the local rank's GPU when CUDA is available,
  else the CPU);
* the weights' dtype for ``--dtype auto``: bfloat16 on a GPU that supports it, float16 on another
  GPU, float32 on the CPU;
* numerics: TF32 matmuls on CUDA; denormal floats flushed to zero on the CPU (``--flush_denormal``;
  x86 arithmetic on denormals is about 100x slower, measurements in ``docs/performance.md``);
* memory: whether freed heap is trimmed (glibc ``malloc_trim``: CPU only) and the activation budget
  of a step (CUDA: a share of the free device memory unless a budget is given);
* whether LoRA dropout masks are drawn on the host with numpy (CPU tensors) or on the tensor's
  device with a seeded torch generator (GPU tensors: no host work, no copies).

Every choice can be forced by building the policy from a device name (``DevicePolicy.of("cuda")``,
with ``bf16`` / memory figures given), so each branch is tested without a GPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

logger = logging.getLogger("preftune.device")

DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: share of the free GPU memory a step's kept activations may use when no budget is given
CUDA_ACTIVATION_SHARE = 0.5
#: the CPU's activation budget when none is given, GiB (docs/performance.md: memory model)
CPU_ACTIVATION_BUDGET_GB = 2.0
_GIB = float(1 << 30)


@dataclass(frozen=True)
class DevicePolicy:
    """The device-dependent choices for one device (see the module docstring).

    ``device``: where the model runs. ``bf16``: the device computes in bfloat16 (CUDA: compute
    capability 8.0+; CPU: True, bf16 autocast works there). ``free_memory_bytes`` /
    ``total_memory_bytes``: the GPU's memory (None on the CPU).
    """

    device: torch.device
    bf16: bool = True
    free_memory_bytes: Optional[int] = None
    total_memory_bytes: Optional[int] = None

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def of(cls, device: Union[str, torch.device, None] = "auto") -> DevicePolicy:
        """The policy of ``device`` (``auto``/None: ``cuda:$LOCAL_RANK`` when CUDA is available, else
        ``cpu``), with the GPU's bf16 support and free / total memory read from CUDA.

        Raises:
            preftune.errors.ConfigError: an unknown device name, or ``cuda`` asked without CUDA.
        """
        from preftune.errors import ConfigError

        name = "auto" if device is None else str(device)
        if name == "auto":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0) or 0)}" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"--device {name!r} is not valid; choose one of: {', '.join(DEVICE_CHOICES)} "
                              "(or cuda:N)") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            dev = torch.device("cuda", index)
            free, total = torch.cuda.mem_get_info(index)
            return cls(dev, bf16=torch.cuda.is_bf16_supported(), free_memory_bytes=int(free),
                       total_memory_bytes=int(total))
        return cls(dev)

    @property
    def is_cuda(self) -> bool:
        """True on an NVIDIA GPU."""
        return self.device.type == "cuda"

    # ---- dtype and numerics ----------------------------------------------------------------------
    def model_dtype(self, requested: str) -> str:
        """The ``--dtype`` to load with: ``auto`` → ``bfloat16`` (GPU with bf16), ``float16`` (other
        GPU), ``float32`` (CPU); any other name as given."""
        if requested != "auto":
            return requested
        if self.is_cuda:
            return "bfloat16" if self.bf16 else "float16"
        return "float32"

    def configure_numerics(self, flush_denormal: bool = True) -> list[str]:
        """Set the process-wide numerics of this device; returns what was set, for the log.

        CUDA: TF32 for float32 matmuls and cuDNN convolutions (``torch.backends``); CPU with
        ``flush_denormal``: denormals flushed to zero (``torch.set_flush_denormal``, x86 SSE3).
        """
        done = []
        if self.is_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            done.append("TF32 matmuls on")
        elif flush_denormal and torch.set_flush_denormal(True):
            done.append("denormal floats flushed to zero (--flush_denormal false to keep them)")
        for line in done:
            logger.info("%s: %s", self.device, line)
        return done

    # ---- memory ------------------------------------------------------------------------------------
    @property
    def trims_heap(self) -> bool:
        """True where returning freed heap to the system helps (the CPU's glibc heap; not on a GPU,
        whose activations live in the CUDA caching allocator)."""
        return not self.is_cuda

    def activation_budget_gb(self, requested: Optional[float]) -> Optional[float]:
        """The activations a step may keep for the backward, GiB: ``requested`` when given (``inf``:
        no limit); without one, :data:`CUDA_ACTIVATION_SHARE` of the free device memory on CUDA and
        :data:`CPU_ACTIVATION_BUDGET_GB` on the CPU."""
        if requested is not None:
            return requested
        if self.is_cuda and self.free_memory_bytes is not None:
            return CUDA_ACTIVATION_SHARE * self.free_memory_bytes / _GIB
        return CPU_ACTIVATION_BUDGET_GB

    # ---- LoRA dropout --------------------------------------------------------------------------------
    @staticmethod
    def host_dropout_masks(tensor: torch.Tensor) -> bool:
        """True when LoRA dropout masks for ``tensor`` are drawn on the host with numpy (CPU tensors:
        faster than torch's serial ``bernoulli_`` there); False on a GPU: drawn on its device."""
        return tensor.device.type == "cpu"

    @staticmethod
    def dropout_generator(tensor: torch.Tensor, seed: int) -> torch.Generator:
        """A torch generator on ``tensor``'s device seeded with ``seed``: the same seed gives the same
        mask in the forward and in the recomputing backward."""
        generator = torch.Generator(device=tensor.device)
        generator.manual_seed(int(seed))
        return generator
