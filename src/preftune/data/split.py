"""Deterministic train / eval split of a record list."""

from __future__ import annotations

import random

from .errors import DataError


def split_indices(n: int, eval_ratio: float, seed: int, *, source: str = "data") -> tuple[list[int], list[int]]:
    """Hold out ``round(n * eval_ratio)`` records (at least 1) for evaluation, chosen with ``seed``.

    The same ``(n, eval_ratio, seed)`` always gives the same split (a private
    :class:`random.Random`, independent of the global random state). Both index lists are in file
    order. Raises :class:`DataError` when fewer than 2 records leave no room for both parts.
    """
    if not 0.0 < eval_ratio < 1.0:
        raise DataError(f"{source}: eval_ratio must be in (0, 1) to split, got {eval_ratio}")
    n_eval = max(1, round(n * eval_ratio))
    if n_eval >= n:
        raise DataError(f"{source}: {n} records cannot be split with eval_ratio {eval_ratio} "
                        "(the training part would be empty)")
    held_out = set(random.Random(seed).sample(range(n), n_eval))
    train = [i for i in range(n) if i not in held_out]
    return train, sorted(held_out)
