"""What tokenisation counts and how a pair is cut to length (shared by text and image records).

:func:`truncate_pair` applies the truncation rules of :mod:`preftune.data.tokenize` to one pair of
token-id lists; :class:`TokenizeStats` counts what happened; :func:`record_margin` reads a
record's reward-model margin.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Optional

from .errors import DataError, where

DROP_PROMPT_FILLS = "prompt fills max_length"


@dataclass
class TokenizeStats:
    """Counts from one :func:`tokenize_records` call.

    ``records``: pairs given; ``kept``: pairs returned; ``prompts_truncated``: pairs whose prompt
    was cut; ``completions_truncated``: completions cut (chosen and rejected counted separately);
    ``dropped``: reason -> pairs dropped; ``boundary_mismatches``: pairs whose joined
    prompt+completion text encodes differently from the separate encodings; ``identical``: kept
    pairs whose chosen and rejected tokens are equal; ``kept_index``: the position in ``records`` of
    each returned pair (this call only; :meth:`combine` leaves it empty).
    """

    records: int = 0
    kept: int = 0
    prompts_truncated: int = 0
    completions_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    boundary_mismatches: int = 0
    identical: int = 0
    kept_index: list = field(default_factory=list)

    @classmethod
    def combine(cls, parts: list[TokenizeStats]) -> TokenizeStats:
        """The sum of several files' counts."""
        out = (type(parts[0]) if parts else cls)()  # a subclass (data/vision.py) keeps its own counts
        for part in parts:
            for f in fields(out):
                value = getattr(part, f.name, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    setattr(out, f.name, getattr(out, f.name) + value)
            out.dropped.update(part.dropped)
        return out

    @property
    def num_dropped(self) -> int:
        """Total pairs dropped."""
        return sum(self.dropped.values())

    def summary(self, label: str = "data") -> str:
        """``"data: 1600 records, 12 prompts truncated, 3 completions truncated, 0 dropped"`` (+ details)."""
        text = (f"{label}: {self.records} records, {self.prompts_truncated} prompts truncated, "
                f"{self.completions_truncated} completions truncated, {self.num_dropped} dropped")
        if self.dropped:
            text += " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dropped.items())) + ")"
        if self.identical:
            text += f", {self.identical} with identical chosen/rejected tokens"
        if self.boundary_mismatches:
            text += (f", {self.boundary_mismatches} pairs encode differently when prompt and completion are "
                     "joined (separate encoding used)")
        return text


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], *, max_length: Optional[int],
                  max_prompt_length: Optional[int], max_completion_length: Optional[int],
                  truncation_mode: str = "keep_end", bos_id: Optional[int] = None):
    """Apply the truncation rules of the module docstring to one pair of token-id lists.

    ``bos_id``: when given and the prompt starts with it, ``keep_end`` keeps it in front.
    Returns ``(prompt, chosen, rejected, prompt_cut: bool, completions_cut: int, drop_reason | None)``.
    """
    completions = [chosen, rejected]
    cut = 0
    if max_completion_length is not None:
        for i, ids in enumerate(completions):
            if len(ids) > max_completion_length:
                completions[i], cut = ids[:max_completion_length], cut + 1
    longest = max(len(ids) for ids in completions)
    prompt_cut = False
    too_long = max_length is not None and len(prompt) + longest > max_length
    if max_prompt_length is not None and len(prompt) > max_prompt_length and (max_length is None or too_long):
        prompt, prompt_cut = _cut_prompt(prompt, max_prompt_length, truncation_mode, bos_id), True
    if max_length is not None:
        room = max_length - len(prompt)
        if room <= 0:
            return prompt, completions[0], completions[1], prompt_cut, cut, DROP_PROMPT_FILLS
        for i, ids in enumerate(completions):
            if len(ids) > room:
                completions[i], cut = ids[:room], cut + 1
    if not completions[0] or not completions[1]:
        return prompt, completions[0], completions[1], prompt_cut, cut, "empty completion"
    return prompt, completions[0], completions[1], prompt_cut, cut, None


def _cut_prompt(prompt: list[int], limit: int, mode: str, bos_id: Optional[int]) -> list[int]:
    if mode == "keep_start":
        return prompt[:limit]
    if bos_id is not None and prompt and prompt[0] == bos_id and limit > 1:
        return [bos_id] + prompt[len(prompt) - (limit - 1):]
    return prompt[len(prompt) - limit:]


def record_margin(record: dict, location: str, source: str) -> Optional[float]:
    """The record's reward-model ``margin`` as a float, None without one.

    Raises :class:`DataError` (file, record, field ``margin``) for a non-numeric or non-finite value.
    """
    value = record.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DataError(f"{where(source, location, 'margin')}: expected a finite number (the reward margin of "
                        f"--loss rm), got {value!r}")
    return float(value)
