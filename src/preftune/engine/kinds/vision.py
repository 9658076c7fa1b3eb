"""Vision–language models: the prompt's images encoded once per pair, merged into the prompt's embeddings.

Covered families (``config.model_type``): LLaVA (``llava``), LLaVA-NeXT (``llava_next``), Qwen2-VL /
Qwen2.5-VL (``qwen2_vl``, ``qwen2_5_vl``), Idefics3 / SmolVLM (``idefics3``, ``smolvlm``) — any
``AutoModelForImageTextToText`` model whose inner model has ``get_image_features`` and whose config
names an ``image_token_id``.

How a batch runs (:mod:`preftune.engine.layout` lays it out; the processor expanded every image
into one placeholder token per image feature row at tokenisation, :mod:`preftune.data.vision`):

1. :func:`image_batch_inputs` (called by ``collate_pairs``) loads each pair's prompt images once
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

from typing import Any

import torch
from torch import nn

from preftune.engine.attention import attention_inputs
from preftune.engine.kinds import KINDS, register_kind
from preftune.engine.kinds.causal import get_decoder_and_head

# model_type -> family name; every one is exercised on a tiny model in tests/test_vision.py
SUPPORTED_FAMILIES = {"llava": "LLaVA", "llava_next": "LLaVA-NeXT", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL",
                      "idefics3": "Idefics3", "smolvlm": "SmolVLM"}
PIXEL_PREFIX = "pixel."
# families whose processor returns pixel_values (batch, images, C, H, W) and pixel_attention_mask
# (batch, images, H, W): the loader drops the batch dim, the kind puts it back (one batch of all images)
BATCH_DIM_FAMILIES = ("idefics2", "idefics3", "smolvlm")
BATCH_DIM_KEYS = ("pixel_values", "pixel_attention_mask")
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate on dim 0 after right-padding every other dim with zeros to the largest size
    (LLaVA-NeXT patch counts, Idefics3 image sizes differ between prompts)."""
    if len({t.shape[1:] for t in tensors}) == 1:
        return torch.cat(tensors)
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = []
    for t in tensors:
        pad = []
        for d in range(t.dim() - 1, 0, -1):
            pad += [0, shape[d - 1] - t.shape[d]]
        out.append(nn.functional.pad(t, pad))
    return torch.cat(out)


def image_batch_inputs(pairs: list, placed: list, width: int) -> dict[str, torch.Tensor]:
    """Image tensors of a batch and where its image tokens sit (see the module docstring).

    Args:
        pairs: the batch's :class:`preftune.types.TokenizedPair` (some may have ``images``).
        placed: ``(unit, row, offset)`` of every unit of the layout (``layout._Unit``: ``pair``,
            ``rejected_prompt``, ``prompt_len``, ``tokens``).
        width: row length ``T``.

    Returns (CPU tensors):
        * ``pixel.<name>``: the processor's image tensors of every distinct prompt, concatenated
          in pair order (leading dim: images or patches);
        * ``image_index`` ``(N,)``: flat index into ``rows*T`` of every image placeholder token;
          ``image_source`` ``(N,)``: the feature row (of all prompts' features, in order) it takes;
          ``image_features`` ``()``: the feature rows the encoder must return;
        * ``image_prompt`` ``(rows, T)``: the distinct prompt (``0..K-1``) each token's unit has,
          ``-1`` for text-only units and padding; ``image_prompt_ids`` ``(K, L)`` (0-padded) and
          ``image_prompt_lengths`` ``(K,)``: those prompts' tokens (for M-RoPE positions).

    Raises:
        ValueError: the processor expands a prompt into other tokens than the pair's
            ``prompt_ids`` (the images or the processor changed since tokenisation).
    """
    prompt_of: dict[tuple[int, bool], int] = {}
    prompt_tokens: list[list[int]] = []
    counts: list[int] = []
    loaded: list[dict[str, torch.Tensor]] = []
    for b, pair in enumerate(pairs):
        images = pair.images
        if images is None:
            continue
        sides = (False, True) if images.rejected_paths is not None else (False,)
        for rejected in sides:
            expected = (images.rejected_prompt_ids or pair.prompt_ids) if rejected else pair.prompt_ids
            out = dict(images.load(rejected))
            ids = out.get("input_ids")
            if ids is not None and ids.reshape(-1).tolist() != list(expected):
                raise ValueError(f"pair {b}: the processor now expands the prompt with its images into "
                                 f"{ids.numel()} tokens, tokenisation gave {len(expected)}; were the images "
                                 "or the processor changed?")
            prompt_of[b, rejected] = len(prompt_tokens)
            prompt_tokens.append(list(expected))
            counts.append(sum(1 for t in expected if t == images.image_token_id))
            loaded.append({k: v for k, v in out.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)})
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    rows = 1 + max(r for _, r, _ in placed)
    image_prompt = torch.full((rows, width), -1, dtype=torch.long)
    index, source = [], []
    for unit, r, offset in placed:
        k = prompt_of.get((unit.pair, unit.rejected_prompt))
        if k is None:
            continue
        image_prompt[r, offset:offset + len(unit.tokens)] = k
        token_id = pairs[unit.pair].images.image_token_id
        where = [j for j in range(unit.prompt_len) if unit.tokens[j] == token_id]
        index += [r * width + offset + j for j in where]
        source += range(offsets[k], offsets[k] + len(where))
    batch: dict[str, torch.Tensor] = {}
    for name in loaded[0] if loaded else ():
        parts = [d[name] for d in loaded if name in d]
        if len(parts) != len(loaded):
            raise ValueError(f"the processor returned {name!r} for some prompts only")
        batch[PIXEL_PREFIX + name] = _cat_padded(parts)
    longest = max(len(t) for t in prompt_tokens)
    prompt_ids = torch.zeros((len(prompt_tokens), longest), dtype=torch.long)
    for k, tokens in enumerate(prompt_tokens):
        prompt_ids[k, :len(tokens)] = torch.tensor(tokens)
    batch.update({
        "image_index": torch.tensor(index, dtype=torch.long),
        "image_source": torch.tensor(source, dtype=torch.long),
        "image_features": torch.tensor(offsets[-1]),
        "image_prompt": image_prompt,
        "image_prompt_ids": prompt_ids,
        "image_prompt_lengths": torch.tensor([len(t) for t in prompt_tokens], dtype=torch.long),
    })
    return batch


def _base(model: nn.Module) -> nn.Module:
    from preftune.modeling import unwrap_peft

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
    from preftune.errors import UnsupportedModelError

    model_type = _model_type(_base(model))
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"vision–language model type {model_type!r} is not supported; preftune trains "
            + ", ".join(f"{v} ({k})" for k, v in SUPPORTED_FAMILIES.items()))


class VisionKind:
    """Vision–language models (``AutoModelForImageTextToText``): see the module docstring."""

    name = "vision"

    def matches(self, model: nn.Module) -> bool:
        base = _base(model)
        config = getattr(base, "config", None)
        return (getattr(config, "vision_config", None) is not None and image_token_id(config) is not None
                and hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")
                and base.get_output_embeddings() is not None)

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
                # flash varlen: the text positions lead, so the model finds the packed sequences
                positions = torch.cat([batch["position_ids"][None], positions])
            kwargs["position_ids"] = positions
        hidden = lm(inputs_embeds=embeds, use_cache=False, **kwargs).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"])
        return flat, {}

    def head(self, model: nn.Module) -> nn.Module:
        return get_decoder_and_head(model)[1]


def _register() -> VisionKind:
    # before the causal kind (importing causal above registered it already): a VLM also has a decoder
    kind = VisionKind()
    causal = next((i for i, k in enumerate(KINDS) if k.name == "causal"), None)
    if causal is None:
        return register_kind(kind)
    KINDS.insert(causal, kind)
    return kind


VISION = _register()
