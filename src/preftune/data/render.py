"""Rendering normalised preference records into the texts that are tokenised.

Text records are used as they are. Message records go through the tokenizer's chat template: the
prompt with ``add_generation_prompt=True``, each completion as the full conversation's rendering
minus the prompt's (see :mod:`preftune.data.tokenize` for how the texts are then encoded).
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import DataError, where

logger = logging.getLogger("preftune.data")

__all__ = ["check_no_images", "render_records", "template_kwargs"]


def check_no_images(record: dict, tokenizer: Any, location: str, source: str) -> None:
    """Raise :class:`DataError` (file, record, field ``images`` / ``rejected_images``) when a record
    carries images but ``tokenizer`` is text-only: images are never dropped silently."""
    for name in ("images", "rejected_images"):
        if record.get(name):
            what = ("a processor, but preftune does not tokenise image inputs yet"
                    if hasattr(tokenizer, "image_processor") else
                    f"the model's tokenizer ({type(tokenizer).__name__}) is text-only (no image processor)")
            raise DataError(f"{where(source, location, name)}: {len(record[name])} image(s) given, but {what}, and "
                            "this dataset is vision-related: use a vision-language model, or leave the images out "
                            "explicitly "
                            f"(e.g. --columns {name}=unused_{name})")


def template_kwargs(record: dict) -> dict:
    """Keywords for ``apply_chat_template`` from a normalised message record: ``tools`` and the record's
    ``chat_template_kwargs`` (TRL 1.16's order: the per-row keywords come last and may override ``tools``)."""
    kwargs: dict = {"tools": record["tools"]} if record.get("tools") else {}
    kwargs.update(record.get("chat_template_kwargs") or {})
    return kwargs


def _common_length(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _token_boundary(cut: int, texts: list[str], added: list[str]) -> int:
    """``cut`` moved back to the start of any added token (``<|im_start|>`` ...) whose text it splits in one
    of ``texts``, so the prompt never ends inside a special token's text."""
    moved = True
    while moved and cut > 0:
        moved = False
        for token in added:
            for text in texts:
                start = text.rfind(token, max(0, cut - len(token) + 1), cut + len(token) - 1)  # only a straddling one
                if 0 <= start < cut:
                    cut, moved = start, True
    return cut


def render_records(records: list[dict], tokenizer: Any, locations: list[str], source: str) -> list[tuple]:
    """Texts to encode: ``(prompt, chosen, rejected, prompt_special)`` per record.

    ``prompt_special`` is True for text records (the prompt is encoded with the tokenizer's special
    tokens) and False for message records (the chat template writes its own). Message records are
    rendered with their ``tools`` and ``chat_template_kwargs`` (:func:`template_kwargs`), as TRL 1.16
    renders them. When a template renders the prompt alone differently from the start of the full
    conversation (a generation prompt the conversation does not repeat, e.g. an empty thought block),
    the prompt is the text the three renderings share and the completions start there, as TRL takes
    the common token prefix; such records are counted in a warning (logger ``preftune.data``).
    Raises :class:`DataError` for a prompt that is neither a string nor a message list, or a
    tokenizer without a chat template for message records.
    """
    rendered = []
    eos_text = tokenizer.eos_token
    diverged = []
    for record, location in zip(records, locations):
        if isinstance(record.get("prompt"), str):
            rendered.append((record["prompt"], record["chosen"], record["rejected"], True))
            continue
        if not isinstance(record.get("prompt"), list):
            raise DataError(f"{where(source, location, 'prompt')}: expected a string or a message list")
        if not getattr(tokenizer, "chat_template", None) and not (record.get("chat_template_kwargs") or {}).get(
                "chat_template"):
            raise DataError(f"{source}: conversational records need a tokenizer with a chat template")
        kwargs = template_kwargs(record)
        prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True, **kwargs)
        fulls = [tokenizer.apply_chat_template(record["prompt"] + record[name], tokenize=False, **kwargs)
                 for name in ("chosen", "rejected")]
        shared = min(_common_length(prompt, full) for full in fulls)
        if shared < len(prompt):
            diverged.append(location)
            added = list(getattr(tokenizer, "get_added_vocab", dict)())
            prompt = prompt[:_token_boundary(shared, [prompt, *fulls], added)]
        completions = []
        for full in fulls:
            completion = full[len(prompt):]
            if eos_text and completion.rstrip().endswith(eos_text):
                completion = completion.rstrip()  # whitespace after the end-of-turn EOS is not scored
            completions.append(completion)
        rendered.append((prompt, completions[0], completions[1], False))
    if diverged:
        logger.warning("%s: the chat template renders the prompt alone differently from the start of the full "
                       "conversation in %d of %d records (first: %s); the prompt is the text they share and the "
                       "completion starts there (as TRL 1.16 takes the common prefix)", source, len(diverged),
                       len(records), diverged[0])
    return rendered
