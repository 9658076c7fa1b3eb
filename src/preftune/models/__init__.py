"""Models: where they come from, which class loads them, quantisation, LoRA and the reference adapter.

Imports only go down: ``load`` → ``peft`` / ``tokenizer`` / ``vision`` / ``quant`` → ``arch`` →
``source`` → ``gguf``; the model kind (:mod:`preftune.engine.kinds`) decides every kind-specific
question (loading class, processor, LoRA task and targets, what a model needs from its tokenizer).
The engine never imports this package.

============================  =====================================================================
module                        what
============================  =====================================================================
:mod:`~.gguf`                 the default model, GGUF files converted once into a cached directory
:mod:`~.source`               Hub id / directory / GGUF → what ``from_pretrained`` loads; weight-file
                              checks; one-line load errors; the config before the weights
:mod:`~.arch`                 the model kind (and transformers class) that loads a model
:mod:`~.quant`                QLoRA: 4-bit / 8-bit bitsandbytes base weights
:mod:`~.tokenizer`            tokenizer / processor loading, the one pad-token rule
:mod:`~.vision`               vision–language processors, the vision tower frozen for training
:mod:`~.peft`                 LoRA (task type and targets from the kind), the reference adapter,
                              saving the adapter
:mod:`~.lora_dropout`         LoRA dropout without copies of the input
:mod:`~.load`                 ``load_model``, ``load_model_and_tokenizer``, gradient checkpointing
============================  =====================================================================
"""

from .gguf import default_model_path, model_cache_root
from .load import (
    load_model,
    load_model_and_tokenizer,
    load_reference_model,
    prepare_for_gradient_checkpointing,
)
from .peft import (
    REFERENCE_ADAPTER,
    ReferenceModelRequiredError,
    apply_peft,
    reference_context,
    resolve_target_modules,
    save_adapter,
)
from .quant import check_sharding, quantization_identity
from .source import resolve_model_source
from .tokenizer import ensure_pad_token, load_tokenizer, ready_tokenizer

__all__ = [
    "REFERENCE_ADAPTER", "ReferenceModelRequiredError", "apply_peft", "check_sharding", "default_model_path",
    "ensure_pad_token",
    "load_model", "load_model_and_tokenizer", "load_reference_model", "load_tokenizer", "model_cache_root",
    "prepare_for_gradient_checkpointing", "quantization_identity", "ready_tokenizer", "reference_context",
    "resolve_model_source", "resolve_target_modules", "save_adapter",
]
