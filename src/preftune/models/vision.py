"""Vision–language models' processors, and the vision tower frozen for training.

A model whose config is a vision–language config loads with ``AutoModelForImageTextToText``
(:mod:`preftune.models.arch`, :mod:`preftune.engine.kinds.vision`) with the same dtype, attention
kernel, 4-bit and weight-file rules as a text model; its processing class is the
``AutoProcessor`` (:func:`preftune.models.tokenizer.load_processor`), what preftune passes around as "the tokenizer" (saved next
to the adapter). Data tokenisation takes the processor (it expands each image into its tokens) and
reads the text tokenizer as ``processor.tokenizer`` (:func:`preftune.data.vision.text_tokenizer`);
the pad token falls back to EOS as for text models. For training, the vision tower — the vision
encoder and its projector / connector into the language model, everything outside the language
model and the LM head — is frozen unless ``--freeze_vision_tower false`` (:func:`freeze_vision_tower`),
and LoRA goes on the language model only (:func:`preftune.engine.kinds.vision.vision_lora_targets`).

Families covered by tests on tiny random models built from their configs:
:data:`preftune.engine.kinds.vision.SUPPORTED_FAMILIES`. Other vision–language families are refused
with :class:`~preftune.errors.UnsupportedModelError` (some need another attention pattern for image
tokens, e.g. Gemma 3 / PaliGemma, or take images by cross-attention, e.g. Mllama).
"""

from __future__ import annotations

from torch import nn

from preftune.engine.kinds import kind_for


def freeze_vision_tower(model: nn.Module) -> int:
    """``requires_grad=False`` on what the model's kind freezes for training (a vision–language model:
    the vision encoder and its projector, everything outside the language model and the LM head);
    returns how many parameter tensors were frozen."""
    params = kind_for(model).freezable_parameters(model)
    for _, p in params:
        p.requires_grad_(False)
    return len(params)
