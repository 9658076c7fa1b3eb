"""Image references of preference records: validated, resolved, kept on the normalised record.

Any format may carry ``images`` (a list of paths or URLs, or one string) or, as TRL's single-image
datasets do, ``image`` (one path or URL; kept as ``images``); swift 3.x may also carry
``rejected_images`` (images of the rejected side when they differ). The normalised record keeps
them under ``images`` / ``rejected_images`` as lists of strings:

* ``http://``, ``https://`` and ``data:`` URLs are kept unchanged;
* an absolute path is kept (resolved, symlinks followed) and must name a file;
* a relative path is resolved against the data file's folder and must stay inside it after
  resolving (``../`` or a symlink leading out is an error: no path traversal) and name a file.
  Records from a Hub dataset have no folder, so their relative paths are an error.

Embedded image data (a ``datasets`` ``Image`` feature's ``{"bytes": ...}``, a PIL image, an array)
is an error naming the field: preftune reads images from files, and a text-only model cannot use
them at all (TRL raises ``ValueError`` for a vision dataset with a text-only model; so does this,
as :class:`preftune.data.DataError`). Nothing is read here (only ``os.path`` checks). Where the images go in the conversation is left
as written: ``<image>`` tags in swift / ShareGPT text, ``{"type": "image"}`` parts in TRL's
messages. Tokenising a record with images needs a vision-language processor; with a text-only
tokenizer it is an error (:func:`preftune.data.tokenize.tokenize_records`), never a silent drop.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from .validate import Here

URL_PREFIXES = ("http://", "https://", "data:")
IMAGE_FIELDS = ("images", "rejected_images")
SINGLE_IMAGE_FIELD = "image"  # TRL's single-image datasets (trl-internal-testing/zen-image): kept as "images"


def record_images(here: Here, record: dict, base_dir: Optional[str]) -> dict[str, list[str]]:
    """``{"images": [...], "rejected_images": [...]}`` of one record, each only when given and not empty
    (``image`` is read as a one-image ``images``).

    Raises :class:`preftune.data.DataError` as :func:`resolve_images` does, and for ``image`` given
    together with ``images``.
    """
    out = {}
    for name in IMAGE_FIELDS:
        images = resolve_images(here, record, name, base_dir)
        if images:
            out[name] = images
    if record.get(SINGLE_IMAGE_FIELD) is not None:
        if "images" in out:
            raise here.fail(SINGLE_IMAGE_FIELD, "given together with 'images'; give one of them")
        value = record[SINGLE_IMAGE_FIELD]
        images = resolve_images(here, {SINGLE_IMAGE_FIELD: [value] if not isinstance(value, list) else value},
                                SINGLE_IMAGE_FIELD, base_dir)
        if images:
            out["images"] = images
    return out


def resolve_images(here: Here, record: dict, name: str, base_dir: Optional[str]) -> Optional[list[str]]:
    """The validated image list of field ``name`` (None when absent or empty).

    Raises :class:`preftune.data.DataError` (file, record, field ``name[i]``) for a value that is
    not a path string, a relative path without a data folder or leading outside it, or a path
    that names no file.
    """
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise here.fail(name, f"expected a list of image paths, got {type(value).__name__}")
    out = []
    for index, item in enumerate(value):
        label = f"{name}[{index}]"
        if isinstance(item, dict) and isinstance(item.get("path"), str) and item.get("bytes") is None:
            item = item["path"]  # a datasets Image feature that only stores a path
        if not isinstance(item, str) and not _embedded(item) or isinstance(item, str) and not item.strip():
            raise here.fail(label, f"expected an image path or URL string, got {_kind(item)}")
        if not isinstance(item, str):
            raise here.fail(label, f"embedded image data ({_kind(item)}): this dataset is vision-related (it holds "
                                   "images), which needs a vision-language model, and preftune reads images from "
                                   "file paths or URLs only; save the images to files and give their paths, or "
                                   f"leave the column out (e.g. --columns {name}=unused_{name})")
        out.append(item if item.startswith(URL_PREFIXES) else _resolve_path(here, label, item, base_dir))
    return out or None


def _resolve_path(here: Here, label: str, path: str, base_dir: Optional[str]) -> str:
    if os.path.isabs(path):
        full = os.path.realpath(path)
    else:
        if base_dir is None:
            raise here.fail(label, f"relative image path {path!r}, but the data has no folder to resolve it "
                                   "against (a Hub dataset); give absolute paths or URLs")
        root = os.path.realpath(base_dir)
        full = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, full]) != root:
            raise here.fail(label, f"{path!r} resolves to {full}, outside the data file's folder {root}; "
                                   "relative image paths must stay inside it")
    if not os.path.isfile(full):
        raise here.fail(label, f"{path!r}: no such image file ({full})")
    return full


def _embedded(value: Any) -> bool:
    """An image held in memory: a datasets ``Image`` feature's ``{"bytes": ...}``, raw bytes, a PIL image, an array."""
    return (isinstance(value, (bytes, bytearray)) or isinstance(value, dict) and value.get("bytes") is not None
            or hasattr(value, "getpixel") or hasattr(value, "__array__"))


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "an empty string"
    if isinstance(value, dict) and value.get("bytes") is not None:
        return "a datasets Image feature's bytes"
    return type(value).__name__
