"""Tokenising preference records with images for a vision–language model's processor.

A record normalised by :mod:`preftune.data.formats` may carry ``images`` (resolved local paths,
:mod:`preftune.data.media`) and ``rejected_images`` (other images for the rejected side, ms-swift).
Where each image goes:

* ``<image>`` tags in the text (ms-swift, LLaMA-Factory) or ``{"type": "image"}`` content parts
  (TRL) mark the places, in order; their count must equal the number of images;
* without any tag or part, the images go before the first user text (the start of a standard
  prompt), as in ms-swift and TRL.

Tags in a completion are an error (images are part of the prompt). Every image is opened with PIL
when the record is tokenised; a missing, unreadable or non-image file is a :class:`DataError` naming
the data file, the record and the image path. Image URLs are not fetched (no network during
training): download them and give the paths.

The prompt is rendered as text — the processor's chat template over messages with image parts
(``add_generation_prompt=True``), or for a standard string prompt the string with each tag replaced
by the model's image placeholder (:func:`image_placeholder`) — and encoded by the processor with the
images, which expands each placeholder into one token per image feature row (LLaVA: one per
patch; Qwen2-VL: one per merged patch of the image's own grid; Idefics3: the image's row/column
grid). Completions are cut out of the full rendering as for text records
(:mod:`preftune.data.tokenize`) and encoded by the text tokenizer (``processor.tokenizer``). The
pair keeps the rendered prompt and the paths (:class:`preftune.types.PairImages`): the pixels are
computed again when a batch is laid out, never stored.

Truncation: image tokens are never cut (a cut image would leave features without tokens). A
prompt with images is kept whole even when longer than ``--max_prompt_length`` (counted); the
completions are cut to fit ``--max_length``; a pair whose prompt alone fills ``--max_length`` is
dropped (counted, as every drop). Records without images follow the text rules exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional

from preftune.types import PairImages, TokenizedPair

from .errors import DataError, where
from .truncation import DROP_PROMPT_FILLS, TokenizeStats, record_margin, truncate_pair

IMAGE_TAG = "<image>"
URL_PREFIXES = ("http://", "https://", "data:")
IMAGE_FIELDS = ("images", "rejected_images")


def is_processor(obj: Any) -> bool:
    """True for a multimodal processor (an ``image_processor`` next to a ``tokenizer``)."""
    return getattr(obj, "image_processor", None) is not None and getattr(obj, "tokenizer", None) is not None


def text_tokenizer(obj: Any) -> Any:
    """The text tokenizer of a processing class: ``processor.tokenizer`` for a processor, else ``obj``."""
    return obj.tokenizer if is_processor(obj) else obj


def image_placeholder(processor: Any) -> str:
    """The text that stands for one image in a prompt the processor expands (before expansion).

    Qwen2-VL / Qwen2.5-VL: ``<|vision_start|><|image_pad|><|vision_end|>`` (what their chat template
    writes); every other processor: its ``image_token`` (LLaVA, LLaVA-NeXT, Idefics3, SmolVLM: ``<image>``).
    """
    token = getattr(processor, "image_token", None) or IMAGE_TAG
    if type(processor).__name__.startswith(("Qwen2VL", "Qwen2_5_VL")):
        return f"<|vision_start|>{token}<|vision_end|>"
    return token


def _batch_dim_keys(processor: Any) -> tuple[str, ...]:
    """Keys the processor returns with a leading batch dim (Idefics / SmolVLM pixel tensors)."""
    if type(processor).__name__.startswith(("Idefics", "SmolVLM")):
        return ("pixel_values", "pixel_attention_mask")
    return ()


def open_image(path: str, *, source: str = "data", location: str = "record", label: str = "images"):
    """The image at ``path`` as an RGB ``PIL.Image``.

    Raises:
        DataError: a URL, a missing or unreadable file or one that is not an image, naming
            ``source``, ``location``, the field ``label`` and the path.
    """
    from PIL import Image, UnidentifiedImageError

    if path.startswith(URL_PREFIXES):
        raise DataError(f"{where(source, location, label)}: {path[:80]!r} is a URL; preftune does not fetch "
                        "images during training: download it and give the local path")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{where(source, location, label)}: image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{where(source, location, label)}: cannot read {path} as an image "
                        f"({type(err).__name__}: {err})") from None


def images_digest(paths: list[str]) -> str:
    """sha1 (hex) over the bytes of the files at ``paths``, in order (the reference-cache key)."""
    h = hashlib.sha1()
    for path in paths:
        with open(path, "rb") as handle:
            data = handle.read()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class ImageLoader:
    """``loader(prompt_text, paths) -> dict of tensors``: the processor over one rendered prompt and
    its images (:class:`preftune.types.PairImages`). The batch dim of Idefics-style pixel tensors is
    dropped so every tensor has one leading row per image (or patch)."""

    def __init__(self, processor: Any, add_special_tokens: bool):
        self.processor = processor
        self.add_special_tokens = add_special_tokens
        self.batch_dim_keys = _batch_dim_keys(processor)

    def __call__(self, prompt_text: str, paths: list[str]) -> dict:
        images = [open_image(p) for p in paths]
        out = self.processor(text=[prompt_text], images=[images], return_tensors="pt",
                             add_special_tokens=self.add_special_tokens)
        return {k: (v[0] if k in self.batch_dim_keys else v) for k, v in out.items()}


@dataclass
class VisionTokenizeStats(TokenizeStats):
    """:class:`TokenizeStats` plus ``images`` (image files read) and ``long_image_prompts``
    (prompts with images longer than ``--max_prompt_length``, kept whole)."""

    images: int = 0
    long_image_prompts: int = 0

    def summary(self, label: str = "data") -> str:
        text = super().summary(label) + f", {self.images} images"
        if self.long_image_prompts:
            text += (f", {self.long_image_prompts} prompts with images longer than --max_prompt_length kept whole "
                     "(image tokens are never cut)")
        return text


def _parts(text: str) -> list[dict]:
    """``"a <image> b"`` -> text / image content parts (empty texts left out)."""
    out: list[dict] = []
    for i, piece in enumerate(text.split(IMAGE_TAG)):
        if i:
            out.append({"type": "image"})
        if piece:
            out.append({"type": "text", "text": piece})
    return out


def _slots(content: Any) -> int:
    if isinstance(content, str):
        return content.count(IMAGE_TAG)
    return sum(1 for part in content if part.get("type") == "image") + sum(
        part.get("text", "").count(IMAGE_TAG) for part in content if part.get("type") == "text")


def _as_parts(content: Any) -> list[dict]:
    if isinstance(content, str):
        return _parts(content)
    out: list[dict] = []
    for part in content:
        out += _parts(part["text"]) if part.get("type") == "text" else [{"type": "image"}]
    return out


def _multimodal_messages(messages: list[dict], n_images: int) -> list[dict]:
    """Messages with list-of-parts content; ``n_images`` image parts put first in the first user
    message when the messages mark no place for them."""
    out = [{"role": m["role"], "content": _as_parts(m["content"])} for m in messages]
    if n_images and not any(_slots(m["content"]) for m in messages):
        first = next((m for m in out if m["role"] == "user"), out[0])
        first["content"] = [{"type": "image"} for _ in range(n_images)] + first["content"]
    return out


class _Renderer:
    """Prompt / completion texts of one record, with the image checks."""

    def __init__(self, processor: Any, source: str):
        self.processor = processor
        self.tokenizer = text_tokenizer(processor)
        self.source = source
        self.placeholder = image_placeholder(processor)

    def fail(self, location: str, name: str, problem: str) -> DataError:
        return DataError(f"{where(self.source, location, name)}: {problem}")

    def check_count(self, location: str, slots: int, images: list[str], name: str = "images") -> None:
        if slots and slots != len(images):
            raise self.fail(location, name, f"{len(images)} images but {slots} {IMAGE_TAG} tags / image parts "
                            "in the prompt; give one tag per image, in order (or none: the images then go "
                            "before the first user text)")

    def render(self, record: dict, location: str, images: list[str]) -> tuple[str, list[str], bool]:
        """``(prompt_text, [chosen_text, rejected_text], prompt_takes_special_tokens)``."""
        prompt = record["prompt"]
        for name in ("chosen", "rejected"):
            value = record[name]
            if _slots(value) if isinstance(value, str) else any(_slots(m["content"]) for m in value):
                raise self.fail(location, name, f"{IMAGE_TAG} tag or image part in a completion; images belong "
                                "to the prompt")
        if isinstance(prompt, str):
            slots = prompt.count(IMAGE_TAG)
            self.check_count(location, slots, images)
            text = prompt.replace(IMAGE_TAG, self.placeholder) if slots else self.placeholder * len(images) + prompt
            return text, [record["chosen"], record["rejected"]], True
        if not getattr(self.processor, "chat_template", None):
            raise DataError(f"{self.source}: conversational records with images need a processor with a chat "
                            "template; this processor has none")
        self.check_count(location, sum(_slots(m["content"]) for m in prompt), images)
        messages = _multimodal_messages(prompt, len(images))
        prompt_text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        completions = []
        eos = self.tokenizer.eos_token
        for name in ("chosen", "rejected"):
            full = self.processor.apply_chat_template(messages + _multimodal_messages(record[name], 0), tokenize=False)
            if not full.startswith(prompt_text):
                raise self.fail(location, name, "the chat template renders the prompt differently inside the full "
                                "conversation, so the completion cannot be cut out of it")
            completion = full[len(prompt_text):]
            if eos and completion.rstrip().endswith(eos):
                completion = completion.rstrip()
            completions.append(completion)
        return prompt_text, completions, False


def tokenize_image_records(records: list[dict], processor: Any, data_args: Any, *,
                           locations: Optional[list[str]] = None, source: str = "data"
                           ) -> tuple[list[TokenizedPair], VisionTokenizeStats]:
    """Tokenise normalised records (with or without ``images``) for a vision–language processor.

    ``records``: ``{"prompt", "chosen", "rejected"[, "images", "rejected_images"]}`` (strings or
    message lists). ``data_args``: ``max_length``, ``max_prompt_length``, ``max_completion_length``,
    ``truncation_mode``. Returns the kept pairs (pairs with images carry
    :class:`preftune.types.PairImages`) and the counts. See the module docstring for the rules.

    Raises:
        DataError: tag / image count mismatch, a tag in a completion, an unreadable image, a
            processor without chat template for message records, a tokenizer without EOS.
    """
    locations = locations or [f"record {i}" for i in range(1, len(records) + 1)]
    renderer = _Renderer(processor, source)
    tok = renderer.tokenizer
    eos = tok.eos_token_id
    if eos is None:
        raise DataError(f"{source}: the tokenizer has no EOS token; completions need one to end")
    image_id = getattr(processor, "image_token_id", None)
    if image_id is None:
        image_id = tok.convert_tokens_to_ids(getattr(processor, "image_token", IMAGE_TAG))
    loaders = {special: ImageLoader(processor, special) for special in (True, False)}
    stats = VisionTokenizeStats(records=len(records))
    pairs: list[TokenizedPair] = []
    for index, (record, location) in enumerate(zip(records, locations)):
        images = list(record.get("images") or [])
        rejected_images = record.get("rejected_images")
        for name, paths in (("images", images), ("rejected_images", rejected_images or [])):
            for i, path in enumerate(paths):
                open_image(path, source=source, location=location, label=f"{name}[{i}]")
        if rejected_images is not None and len(rejected_images) != len(images):
            raise renderer.fail(location, "rejected_images", f"{len(rejected_images)} rejected images for "
                                f"{len(images)} images; the rejected side must have one image per prompt image")
        stats.images += len(images) + len(rejected_images or [])
        prompt_text, completions, special = renderer.render(record, location, images)
        loader = loaders[special]
        if images:
            prompt = loader(prompt_text, images)["input_ids"].reshape(-1).tolist()
        else:
            prompt = tok(prompt_text, add_special_tokens=special)["input_ids"]
        sides = [_end(tok(text, add_special_tokens=False)["input_ids"], eos) for text in completions]
        if images and data_args.max_prompt_length is not None and len(prompt) > data_args.max_prompt_length:
            stats.long_image_prompts += 1
        prompt, chosen, rejected, prompt_cut, cut, drop = truncate_pair(
            prompt, sides[0], sides[1], max_length=data_args.max_length,
            max_prompt_length=None if images else data_args.max_prompt_length,
            max_completion_length=data_args.max_completion_length, truncation_mode=data_args.truncation_mode,
            bos_id=tok.bos_token_id if special else None)
        stats.prompts_truncated += prompt_cut
        stats.completions_truncated += cut
        if drop:
            stats.dropped[drop if not (images and drop == DROP_PROMPT_FILLS) else "prompt with images fills max_length"] += 1
            continue
        stats.identical += chosen == rejected and record.get("label") is None
        pair = TokenizedPair(prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected,
                             margin=record_margin(record, location, source), location=where(source, location),
                             label=record.get("label"))
        if images:
            pair.images = PairImages(paths=images, prompt_text=prompt_text, image_token_id=int(image_id),
                                     loader=loader, digest=images_digest(images + list(rejected_images or [])))
            if rejected_images is not None and rejected_images != images:
                pair.images.rejected_paths = list(rejected_images)
                rejected_prompt = loader(prompt_text, rejected_images)["input_ids"].reshape(-1).tolist()
                if rejected_prompt != prompt:
                    pair.images.rejected_prompt_ids = rejected_prompt
                    if data_args.max_length is not None and len(rejected_prompt) + len(rejected) > data_args.max_length:
                        stats.dropped["prompt with images fills max_length"] += 1
                        continue
        stats.kept_index.append(index)
        pairs.append(pair)
    stats.kept = len(pairs)
    return pairs, stats


def prompt_inputs(processor: Any, record: dict, *, source: str = "data", location: str = "record") -> tuple[str, dict]:
    """The rendered prompt of a normalised record and the processor's model inputs for it
    (``input_ids`` ``(1, P)``, ``attention_mask``, pixel tensors ...), for generation.

    Same placement rules and errors as :func:`tokenize_image_records`."""
    images = list(record.get("images") or [])
    for i, path in enumerate(images):
        open_image(path, source=source, location=location, label=f"images[{i}]")
    filler = record.get("chosen") if record.get("chosen") is not None else \
        ("" if isinstance(record["prompt"], str) else [{"role": "assistant", "content": "."}])
    full = dict(record, chosen=filler, rejected=filler)
    text, _, special = _Renderer(processor, source).render(full, location, images)
    if images:
        return text, processor(text=[text], images=[[open_image(p) for p in images]], return_tensors="pt",
                               add_special_tokens=special)
    return text, text_tokenizer(processor)(text, return_tensors="pt", add_special_tokens=special)


def _end(ids: list[int], eos: int) -> list[int]:
    return list(ids) if ids[-1:] == [eos] else list(ids) + [eos]


__all__ = ["IMAGE_TAG", "ImageLoader", "VisionTokenizeStats", "image_placeholder", "images_digest", "is_processor",
           "open_image", "prompt_inputs", "text_tokenizer", "tokenize_image_records"]
