"""Image inputs of a laid-out batch for vision–language models (the vision kind's layout).

The text rows come from :func:`preftune.engine.layout.layout_rows` (the processor expanded every
image into one placeholder token per image feature row at tokenisation, :mod:`preftune.data.vision`);
:func:`image_batch_inputs` adds each pair's prompt images, loaded once (``pixel.*`` tensors, one
entry per distinct prompt, in pair order), and records, for every placeholder token of the rows,
its flat position (``image_index``) and the feature row it takes (``image_source``). In the
shared-prompt layout ``[P C R]`` the prompt — and with it every image token — is in the batch once
per pair; in the ``[P C]`` + ``[P R]`` layouts the same feature rows are scattered into both copies
of the prompt. :class:`preftune.engine.kinds.vision.VisionKind` consumes them.
"""

from __future__ import annotations

import torch
from torch import nn

PIXEL_PREFIX = "pixel."
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
