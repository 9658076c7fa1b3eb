"""Vision–language models: the prompt's images encoded once per pair, merged into the prompt's embeddings.

Covered families (``config.model_type``): LLaVA (``llava``), LLaVA-NeXT (``llava_next``), Qwen2-VL /
Qwen2.5-VL (``qwen2_vl``, ``qwen2_5_vl``), Idefics3 / SmolVLM (``idefics3``, ``smolvlm``) — any
``AutoModelForImageTextToText`` model whose inner model has ``get_image_features`` and whose config
names an ``image_token_id``.

How a batch runs (:mod:`preftune.engine.layout` lays it out; the processor expanded every image
into one placeholder token per image feature row at tokenisation, :mod:`preftune.data.vision`):

1. :meth:`VisionKind.collate` lays the text out (:func:`preftune.engine.layout.layout_rows`) and
   :func:`preftune.engine.layout_vision.image_batch_inputs` loads each pair's prompt images once
   (``pixel.*`` tensors, one entry per distinct prompt, in pair order) and records, for every
   placeholder token of the laid-out rows, its flat position (``image_index``) and the feature
   row it takes (``image_source``). In the shared-prompt layout ``[P C R]`` the prompt — and with
   it every image token — is in the batch once per pair; in the ``[P C]`` + ``[P R]`` layouts the
   same feature rows are scattered into both copies of the prompt.
2. :meth:`VisionKind.hidden_at_targets` runs the vision encoder **once** over the batch's images
   (``model.model.get_image_features``; under ``torch.no_grad`` when no vision parameter is trained),
   embeds the tokens, writes the image features at ``image_index`` and runs the language model
   with the layout's attention mask and position ids. The rejected branch never re-encodes an image.
3. Position ids: LLaVA / Idefics3 use the layout's 1-D positions. Qwen2-VL's M-RoPE uses 3-D
   positions: the model's own ``get_rope_index`` is run on each distinct prompt (its image grid
   gives the image tokens their temporal/height/width positions); a completion token at 1-D
   position ``p >= len(prompt)`` gets ``p + delta`` on all three axes (``delta = max prompt
   position + 1 - len(prompt)``), which is what ``get_rope_index`` gives ``[P C]`` and ``[P R]``
   as whole sequences, so chosen, rejected (restarting after the prompt) and packed units all get
   their own sequence's positions.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from preftune.engine.attention import attention_inputs
from preftune.engine.kinds.base import ModelKind, config_value
from preftune.engine.layout import layout_rows
from preftune.engine.layout_vision import PIXEL_PREFIX, image_batch_inputs
from preftune.engine.lm_head import get_decoder_and_head
from preftune.errors import ModelLoadError, UnsupportedModelError
from preftune.modeling import unwrap_peft
from preftune.types import TokenizedPair

logger = logging.getLogger("preftune.models")

# model_type -> family name; every one is exercised on a tiny model in tests/test_vision.py
SUPPORTED_FAMILIES = {"llava": "LLaVA", "llava_next": "LLaVA-NeXT", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL",
                      "idefics3": "Idefics3", "smolvlm": "SmolVLM"}
# families whose processor returns pixel_values (batch, images, C, H, W) and pixel_attention_mask
# (batch, images, H, W): the loader drops the batch dim, the kind puts it back (one batch of all images)
BATCH_DIM_FAMILIES = ("idefics2", "idefics3", "smolvlm")
BATCH_DIM_KEYS = ("pixel_values", "pixel_attention_mask")
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def _base(model: nn.Module) -> nn.Module:
    return unwrap_peft(model)


def _model_type(base: nn.Module) -> str:
    return getattr(getattr(base, "config", None), "model_type", "") or ""


def image_token_id(config: Any) -> int | None:
    """The image placeholder id of a vision–language config (``image_token_id`` / ``image_token_index``)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def vision_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of everything outside the language model and the LM head: the vision
    encoder and its projector / connector into the language model."""
    base = _base(model)
    lm, head = get_decoder_and_head(base)
    inside = {id(p) for p in lm.parameters()} | {id(p) for p in head.parameters()}
    return [(n, p) for n, p in base.named_parameters() if id(p) not in inside]


def encode_images(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Image features of a batch, ``(F, H)`` in the order of the batch's prompts and their images.

    One call of the model's ``get_image_features`` over every image of the batch, under
    ``torch.no_grad`` when no vision parameter requires grad (the default: vision tower frozen).

    Raises:
        ValueError: the encoder returned another number of feature rows than the batch has image
            tokens (``image_features``).
    """
    base = _base(model)
    inner = getattr(base, "model", base)
    encode = getattr(inner, "get_image_features", None) or base.get_image_features
    pixels = {k[len(PIXEL_PREFIX):]: v for k, v in batch.items() if k.startswith(PIXEL_PREFIX)}
    if _model_type(base) in BATCH_DIM_FAMILIES:
        pixels = {k: v.unsqueeze(0) if k in BATCH_DIM_KEYS else v for k, v in pixels.items()}
    trains = any(p.requires_grad for _, p in vision_parameters(model))
    with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
        out = encode(**pixels, return_dict=True)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    else:
        feats = feats.reshape(-1, feats.shape[-1])
    expected = int(batch["image_features"])
    if feats.shape[0] != expected:
        raise ValueError(f"the vision encoder returned {feats.shape[0]} image feature rows for {expected} image "
                         "tokens; the processor and the model disagree on the image token count")
    return feats


def mrope_position_ids(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Qwen2-VL M-RoPE position ids ``(3, rows, T)`` of a laid-out batch (see the module docstring)."""
    base = _base(model)
    pos = batch["position_ids"]
    out = pos[None].expand(3, -1, -1)
    if "image_prompt" not in batch:
        return out.contiguous()
    ids, lengths = batch["image_prompt_ids"], batch["image_prompt_lengths"]
    length = ids.shape[1]
    attention = torch.arange(length, device=ids.device)[None] < lengths[:, None]
    mm_types = (ids == image_token_id(base.config)).int() * attention
    table, deltas = base.model.get_rope_index(ids, mm_token_type_ids=mm_types,
                                              image_grid_thw=batch[PIXEL_PREFIX + "image_grid_thw"],
                                              attention_mask=attention.long())
    k = batch["image_prompt"]
    has = k >= 0
    kc = k.clamp(min=0)
    in_prompt = has & (pos < lengths[kc])
    gathered = table[:, kc, pos.clamp(max=length - 1)]
    after = pos + deltas.reshape(-1).to(pos.dtype)[kc]
    return torch.where(in_prompt[None], gathered, torch.where(has, after, pos)[None].expand(3, -1, -1))


def check_family(model: nn.Module) -> None:
    """Raises :class:`preftune.errors.UnsupportedModelError` for a vision–language model whose
    ``model_type`` is not in :data:`SUPPORTED_FAMILIES` (other attention patterns for image tokens,
    e.g. Gemma 3 / PaliGemma, or images by cross-attention, e.g. Mllama, would be scored wrongly)."""
    model_type = _model_type(_base(model))
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"vision–language model type {model_type!r} is not supported; preftune trains "
            + ", ".join(f"{v} ({k})" for k, v in SUPPORTED_FAMILIES.items()))


def _linear_names(module: nn.Module, prefix: str) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [f"{prefix}.{n}" if prefix else n for n, m in module.named_modules() if n and isinstance(m, (nn.Linear, Conv1D))]


def vision_lora_targets(model: nn.Module, resolved: str | list[str]) -> list[str]:
    """Full module names for peft's ``target_modules`` on a vision–language model.

    ``resolved``: what :func:`preftune.models.peft.resolve_target_modules` made of
    ``--lora_target_modules`` — ``"all-linear"`` (every linear layer) or leaf names (``q_proj`` ...).
    They are taken in the language model (``model.get_decoder()``) and, when the vision tower is
    trainable (``--freeze_vision_tower false``: some vision parameter has ``requires_grad``), in
    the vision tower and projector too. The LM head is never a target.

    Raises:
        ModelLoadError: no linear layer matches.
    """
    names = dict(model.named_modules())
    lm, head = get_decoder_and_head(model)
    lm_prefix = next(n for n, m in names.items() if m is lm)
    candidates = _linear_names(lm, lm_prefix)
    vision = vision_parameters(model)
    train_vision = any(p.requires_grad for _, p in vision)
    if train_vision:
        owners = {n.rsplit(".", 1)[0] for n, _ in vision}
        candidates += [n for n in _linear_names(model, "") if n in owners and not n.startswith(lm_prefix + ".")]
    head_names = {n for n, m in names.items() if m is head}
    candidates = [n for n in candidates if n not in head_names]
    if resolved != "all-linear":
        leaves = set(resolved)
        candidates = [n for n in candidates if n.rsplit(".", 1)[-1] in leaves or n in leaves]
    if not candidates:
        raise ModelLoadError(f"--lora_target_modules {resolved}: no linear layer of the language model "
                             f"({type(lm).__name__}) matches; name its modules (e.g. q_proj v_proj) or use all-linear")
    logger.info("LoRA on %d linear layers of the language model%s", len(candidates),
                " and the vision tower" if train_vision else " (vision tower frozen)")
    return sorted(set(candidates))


class VisionKind(ModelKind):
    """Vision–language models (``AutoModelForImageTextToText`` + ``AutoProcessor``): see the module
    docstring. LoRA goes on the language model only (:func:`vision_lora_targets`); the vision tower
    is what ``--freeze_vision_tower`` freezes."""

    name = "vision"
    auto_class = "AutoModelForImageTextToText"
    processing_class = "AutoProcessor"
    supports_8bit = False
    description = "vision–language models"

    def matches(self, model: nn.Module) -> bool:
        base = _base(model)
        config = getattr(base, "config", None)
        return (getattr(config, "vision_config", None) is not None and image_token_id(config) is not None
                and hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")
                and base.get_output_embeddings() is not None)

    def matches_config(self, config: Any, *, reward_model: bool = False) -> bool:
        """A ``vision_config`` and a model type of ``AutoModelForImageTextToText``."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        return config_value(config, "vision_config") is not None and \
            config_value(config, "model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    def check_config(self, config: Any, name: Optional[str]) -> None:
        """Raises :class:`UnsupportedModelError` for a family outside :data:`SUPPORTED_FAMILIES`."""
        model_type = config_value(config, "model_type")
        if model_type not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"--model_name_or_path {name}: vision–language model type {model_type!r} is not supported; preftune "
                f"trains {', '.join(f'{v} ({k})' for k, v in SUPPORTED_FAMILIES.items())}")

    def collate(self, pairs: list[TokenizedPair], *, share_prompt: bool = True, padding_free: bool = True,
                max_tokens_per_batch: Optional[int] = None, pad_token_id: Optional[int] = None
                ) -> dict[str, torch.Tensor]:
        """The text rows of :func:`preftune.engine.layout.layout_rows` and, when some pair has images,
        the image tensors (``pixel.*``) and where each image token sits
        (:func:`preftune.engine.layout_vision.image_batch_inputs`)."""
        batch, placed, width = layout_rows(pairs, share_prompt=share_prompt, padding_free=padding_free,
                                           max_tokens_per_batch=max_tokens_per_batch,
                                           pad_token_id=0 if pad_token_id is None else pad_token_id)
        if any(p.images is not None for p in pairs):
            batch.update(image_batch_inputs(pairs, placed, width))
        return batch

    def freezable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The vision tower and its projector (:func:`vision_parameters`)."""
        return vision_parameters(model)

    def lora_targets(self, model: nn.Module, resolved: str | list[str]) -> list[str]:
        return vision_lora_targets(model, resolved)

    def hidden_at_targets(self, model: nn.Module, batch: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        base = _base(model)
        check_family(base)
        lm, _ = get_decoder_and_head(model)
        embeds = lm.get_input_embeddings()(batch["input_ids"])
        if "image_index" in batch and batch["image_index"].numel():
            feats = encode_images(model, batch).to(embeds.dtype)
            flat = embeds.reshape(-1, embeds.shape[-1])
            flat = flat.index_put((batch["image_index"],), feats.index_select(0, batch["image_source"]))
            embeds = flat.view_as(embeds)
        kwargs = attention_inputs(lm, batch)
        if _model_type(base) in MROPE_FAMILIES:
            positions = mrope_position_ids(model, batch)
            if kwargs.get("attention_mask") is None and "position_ids" in kwargs:
                # flash varlen (boundaries in cu_seq_lens_q/k): the text positions lead, as the model expects
                positions = torch.cat([batch["position_ids"][None], positions])
            kwargs["position_ids"] = positions
        hidden = lm(inputs_embeds=embeds, use_cache=False, **kwargs).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"])
        return flat, {}

    def head(self, model: nn.Module) -> nn.Module:
        return get_decoder_and_head(model)[1]


KIND = VisionKind()
