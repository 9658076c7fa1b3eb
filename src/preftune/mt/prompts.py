"""Translation prompts and language pairs, as in ALMA (Xu et al. 2023, arXiv 2309.11674, Sec. 3;
reused unchanged by ALMA-R / CPO, Xu et al. 2024, arXiv 2401.08417).

The zero-shot prompt is::

    Translate this from German to English:
    German: <source sentence>
    English:

Whitespace convention (plain, non-chat style). The prompt ends with ``"{Target}:"`` and the
completion starts with a single space: ``" " + translation``. ALMA concatenates prompt and
target text directly and relies on the LLaMA SentencePiece tokenizer adding the word-boundary
marker; with byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen) the explicit leading space keeps the
first target word a normal ``"Ġword"`` token, which is exactly what a model generates after
``"English:"``. Training records (:func:`completion_text`) and :mod:`preftune.mt.translate` both
use this convention, and :func:`clean_translation` strips the space again.

With ``chat_style`` the prompt is one user message and the completion one assistant message
(ALMA's ``--chat_style``); the chat template adds all separators, so no leading space is used.
"""

from __future__ import annotations

from collections.abc import Iterable

LANG_NAMES: dict[str, str] = {
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "fr": "French",
    "gu": "Gujarati",
    "ha": "Hausa",
    "is": "Icelandic",
    "ja": "Japanese",
    "ro": "Romanian",
    "ru": "Russian",
    "uk": "Ukrainian",
    "zh": "Chinese",
}

#: Separator between the prompt's final ``"{Target}:"`` and the translation (plain style).
COMPLETION_PREFIX = " "


def lang_name(code: str) -> str:
    """English name of a language code (``"de"`` -> ``"German"``).

    Raises:
        ValueError: unknown code; the message lists the known codes.
    """
    try:
        return LANG_NAMES[code]
    except KeyError:
        raise ValueError(
            f"unknown language code {code!r}; known codes: {', '.join(sorted(LANG_NAMES))}") from None


def parse_pair(pair: str) -> tuple[str, str]:
    """Split ``"de-en"`` into ``("de", "en")`` and check both codes are known.

    Raises:
        ValueError: not of the form ``src-tgt``, same language twice, or an unknown code.
    """
    parts = pair.strip().split("-")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"language pair {pair!r} must look like 'de-en'")
    src, tgt = parts
    if src == tgt:
        raise ValueError(f"language pair {pair!r} translates a language into itself")
    lang_name(src)
    lang_name(tgt)
    return src, tgt


def parse_language_pairs(spec: str | Iterable[str] | None) -> list[tuple[str, str]] | None:
    """Parse ``"de-en,en-de"`` (or a list of such strings) into ``[("de","en"), ("en","de")]``.

    ``None`` or an empty spec gives ``None`` (meaning "no restriction"). Duplicates are removed,
    order is kept.

    Raises:
        ValueError: any malformed pair (see :func:`parse_pair`).
    """
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in str(s).split(",")]
    pairs: list[tuple[str, str]] = []
    for item in items:
        if not item.strip():
            continue
        pair = parse_pair(item)
        if pair not in pairs:
            pairs.append(pair)
    return pairs or None


def make_prompt(src: str, tgt: str, text: str) -> str:
    """ALMA's zero-shot translation prompt for ``text`` from language ``src`` into ``tgt``."""
    s, t = lang_name(src), lang_name(tgt)
    return f"Translate this from {s} to {t}:\n{s}: {text}\n{t}:"


def completion_text(translation: str, chat_style: bool) -> str:
    """Completion string for training: ``" " + translation`` (plain) or ``translation`` (chat)."""
    return translation if chat_style else COMPLETION_PREFIX + translation


def chat_prompt(prompt: str) -> list[dict[str, str]]:
    """Wrap a prompt as a conversation with one user message."""
    return [{"role": "user", "content": prompt}]


def chat_completion(translation: str) -> list[dict[str, str]]:
    """Wrap a translation as one assistant message."""
    return [{"role": "assistant", "content": translation}]


def generation_prompt(tokenizer, src: str, tgt: str, text: str, chat_style: bool) -> str:
    """The exact text fed to ``generate``: the plain prompt, or the chat-templated user turn
    followed by the assistant header (``add_generation_prompt=True``).

    Raises:
        ValueError: ``chat_style`` with a tokenizer that has no chat template.
    """
    prompt = make_prompt(src, tgt, text)
    if not chat_style:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat_style needs a tokenizer with a chat template; this one has none")
    return tokenizer.apply_chat_template(chat_prompt(prompt), tokenize=False, add_generation_prompt=True)


def clean_translation(generated: str) -> str:
    """Post-process a generated continuation as ALMA's evaluation does: drop leading whitespace
    (including empty lines right after the prompt), cut at the first newline, strip."""
    return generated.lstrip().split("\n", 1)[0].strip()
