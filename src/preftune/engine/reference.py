"""Reference log-probs computed once, before training, and cached on disk.

The DPO family compares the policy with a frozen reference policy. Its log-probs never change
during training, so one pass over the data (LoRA adapters disabled or the starting adapter, or
a separate reference model) gives them for every pair; they are stored on the pairs
(``TokenizedPair.ref_*``), travel in the batch, and no reference forward runs during training.
The values are cached under ``<cache_dir>/<sha256>.pt`` (:func:`default_cache_dir`), keyed by the model identity,
the token ids of every pair and the engine settings that could change the numbers, so a later
run or ``preftune evaluate`` on the same data reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from preftune.engine.layout import collate_pairs
from preftune.engine.logprobs import sequence_logps
from preftune.types import TokenizedPair

logger = logging.getLogger("preftune.engine")


def default_cache_dir() -> Path:
    """``$PREFTUNE_REF_CACHE``, else ``$PREFTUNE_CACHE/ref_logps``, else ``~/.cache/preftune/ref_logps``."""
    if os.environ.get("PREFTUNE_REF_CACHE"):
        return Path(os.environ["PREFTUNE_REF_CACHE"])
    return Path(os.environ.get("PREFTUNE_CACHE", Path.home() / ".cache" / "preftune")) / "ref_logps"


def reference_cache_key(model_key: str, pairs: list[TokenizedPair]) -> str:
    """sha256 (hex) over the model identity string and every pair's token ids."""
    h = hashlib.sha256(model_key.encode())
    for p in pairs:
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(len(ids).to_bytes(4, "little"))
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def compute_reference_logps(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    *,
    reference_context: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
    batch_size: int = 8,
    chunk_size: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reference log-probs of chosen and rejected, ``(N,)`` float64 each (nats).

    Runs the model in eval mode under ``torch.no_grad()`` and ``reference_context()`` (or as
    is when it is None: pass a separate reference model then), shared-prompt packed layout.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    chosen, rejected = [], []
    ctx = reference_context or contextlib.nullcontext
    try:
        with torch.no_grad(), ctx():
            for start in range(0, len(pairs), batch_size):
                batch = collate_pairs(pairs[start:start + batch_size], share_prompt=True, padding_free=True)
                batch = {k: v.to(device) for k, v in batch.items()}
                out = sequence_logps(model, batch, chunk_size)
                chosen.append(out.chosen_logps.double().cpu())
                rejected.append(out.rejected_logps.double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def attach_reference_logps(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    *,
    model_key: str,
    reference_context: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
    cache_dir: Optional[Path] = None,
    batch_size: int = 8,
    chunk_size: Optional[int] = None,
) -> str:
    """Fill ``ref_chosen_logps`` / ``ref_rejected_logps`` of every pair, from the cache or computed.

    Returns ``"cache"`` or ``"computed"``. A cache file that does not hold ``len(pairs)`` values
    is ignored and rewritten.
    """
    if not pairs:
        return "computed"
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"{reference_cache_key(model_key, pairs)}.pt"
    source = "computed"
    values = None
    if path.exists():
        try:
            values = torch.load(path)
            if values["chosen"].shape[0] != len(pairs):
                values = None
        except Exception:  # a broken cache file is recomputed, never trusted
            values = None
        if values is not None:
            source = "cache"
    if values is None:
        c, r = compute_reference_logps(model, pairs, reference_context=reference_context,
                                       batch_size=batch_size, chunk_size=chunk_size)
        values = {"chosen": c, "rejected": r}
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(values, tmp)
        os.replace(tmp, path)
    for p, c, r in zip(pairs, values["chosen"].tolist(), values["rejected"].tolist()):
        p.ref_chosen_logps, p.ref_rejected_logps = c, r
    logger.info("reference log-probs for %d pairs: %s (%s)", len(pairs), source, path)
    return source
