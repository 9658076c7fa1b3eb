"""Rendering normalised preference records into the texts that are tokenised.

Text records are used as they are. Message records go through the tokenizer's chat template: the
prompt with ``add_generation_prompt=True``, each completion as the full conversation's rendering
minus the prompt's (see :mod:`preftune.data.tokenize` for how the texts are then encoded).
"""

from __future__ import annotations

from typing import Any

from .errors import DataError, where

__all__ = ["check_no_images", "render_records"]


def check_no_images(record: dict, tokenizer: Any, location: str, source: str) -> None:
    """Raise :class:`DataError` (file, record, field ``images`` / ``rejected_images``) when a record
    carries images but ``tokenizer`` is text-only: images are never dropped silently."""
    for name in ("images", "rejected_images"):
        if record.get(name):
            what = ("a processor, but preftune does not tokenise image inputs yet"
                    if hasattr(tokenizer, "image_processor") else
                    f"the model's tokenizer ({type(tokenizer).__name__}) is text-only (no image processor)")
            raise DataError(f"{where(source, location, name)}: {len(record[name])} image(s) given, but {what}; "
                            "use a vision-language model, or leave the images out explicitly "
                            f"(e.g. --columns {name}=unused_{name})")


def render_records(records: list[dict], tokenizer: Any, locations: list[str], source: str) -> list[tuple]:
    """Texts to encode: ``(prompt, chosen, rejected, prompt_special)`` per record.

    ``prompt_special`` is True for text records (the prompt is encoded with the tokenizer's special
    tokens) and False for message records (the chat template writes its own).
    Raises :class:`DataError` for a prompt that is neither a string nor a message list, a tokenizer
    without a chat template for message records, or a template whose prompt rendering is not a
    prefix of the full conversation's.
    """
    rendered = []
    eos_text = tokenizer.eos_token
    for record, location in zip(records, locations):
        if isinstance(record.get("prompt"), str):
            rendered.append((record["prompt"], record["chosen"], record["rejected"], True))
            continue
        if not isinstance(record.get("prompt"), list):
            raise DataError(f"{where(source, location, 'prompt')}: expected a string or a message list")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{source}: conversational records need a tokenizer with a chat template")
        prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
        completions = []
        for name in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(record["prompt"] + record[name], tokenize=False)
            if not full.startswith(prompt):
                raise DataError(f"{where(source, location, name)}: the chat template renders the prompt differently "
                                "inside the full conversation, so the completion cannot be cut out of it")
            completion = full[len(prompt):]
            if eos_text and completion.rstrip().endswith(eos_text):
                completion = completion.rstrip()  # whitespace after the end-of-turn EOS is not scored
            completions.append(completion)
        rendered.append((prompt, completions[0], completions[1], False))
    return rendered
