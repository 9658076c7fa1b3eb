"""Image references of preference records: validated, resolved, kept on the normalised record.

Any format may carry ``images`` (a list of paths or URLs, or one string); swift 3.x may also carry
``rejected_images`` (images of the rejected side when they differ). The normalised record keeps
them under the same keys as lists of strings:

* ``http://``, ``https://`` and ``data:`` URLs are kept unchanged;
* an absolute path is kept (resolved, symlinks followed) and must name a file;
* a relative path is resolved against the data file's folder and must stay inside it after
  resolving (``../`` or a symlink leading out is an error: no path traversal) and name a file.
  Records from a Hub dataset have no folder, so their relative paths are an error.

Nothing is read here (only ``os.path`` checks). Where the images go in the conversation is left
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
        if not isinstance(item, str) or not item.strip():
            raise here.fail(label, f"expected an image path or URL string, got {_kind(item)} "
                                   "(embedded image data is not supported)")
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


def _kind(value: Any) -> str:
    return "an empty string" if isinstance(value, str) else type(value).__name__
