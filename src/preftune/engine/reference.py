"""Reference log-probs computed once, before training, and cached on disk.

The DPO family compares the policy with a frozen reference policy. Its log-probs never change
during training, so one pass over the data (LoRA adapters disabled or the starting adapter, or
a separate reference model) gives them for every pair; they are stored on the pairs
(``TokenizedPair.ref_*``), travel in the batch, and no reference forward runs during training.
The values are cached per reference policy (:func:`model_cache_path` under
:func:`default_cache_dir`: model, adapter, dtype, mixed precision) and per pair (its token ids),
so a later run or ``preftune evaluate`` on the same pairs reuses them. The cache is read with
``torch.load(weights_only=True)`` (a crafted file cannot run code; a broken one is recomputed) and
written by the main process only, under an ``fcntl`` lock (read, merge, write a temporary file,
rename), so runs sharing it concurrently keep each other's entries and never see a partial file.
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

from preftune import distributed
from preftune.distributed import is_main_process
from preftune.engine.forward import sequence_outputs
from preftune.engine.kinds import kind_for
from preftune.engine.logprobs import sequence_logps
from preftune.faults import fault_point
from preftune.types import TokenizedPair

logger = logging.getLogger("preftune.engine")


def default_cache_dir() -> Path:
    """``$PREFTUNE_REF_CACHE``, else ``$PREFTUNE_CACHE/ref_logps``, else ``~/.cache/preftune/ref_logps``."""
    if os.environ.get("PREFTUNE_REF_CACHE"):
        return Path(os.environ["PREFTUNE_REF_CACHE"])
    return Path(os.environ.get("PREFTUNE_CACHE", Path.home() / ".cache" / "preftune")) / "ref_logps"


def model_cache_path(model_key: str, cache_dir: Optional[Path] = None) -> Path:
    """The cache file of one reference policy: ``<cache_dir>/<sha256(model_key)[:32]>.pt``."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return cache / f"{hashlib.sha256(model_key.encode()).hexdigest()[:32]}.pt"


def pair_key(pair: TokenizedPair) -> str:
    """sha1 (hex) of a pair's prompt, chosen and rejected token ids (with their lengths), and of its
    images' bytes when it has images (:attr:`PairImages.digest`: same tokens, other pictures, other key)."""
    h = hashlib.sha1()
    for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
        h.update(len(ids).to_bytes(4, "little"))
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    images = getattr(pair, "images", None)
    if images is not None:
        h.update(b"images:" + images.digest.encode() + b"|rejected:" + str(images.rejected_paths is not None).encode())
    return h.hexdigest()


def progress_disabled() -> bool:
    """``TQDM_DISABLE`` is set to 1 / true (``--disable_tqdm true`` sets it, :func:`preftune.train.setup`).

    Read at each call: tqdm reads its own ``TQDM_*`` variables once, when it is imported, which is
    before a run's flags are known."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")


def progress_bar(total: int, desc: str, unit: str = "pair"):
    """A tqdm bar (count, rate, time left) for a long pass over ``total`` items; shown on the main
    process only, hidden when :func:`progress_disabled`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
                disable=progress_disabled() or not is_main_process())


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
    is when it is None: pass a separate reference model then), shared-prompt packed layout, with a
    progress bar (:func:`progress_bar`).
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    chosen, rejected = [], []
    ctx = reference_context or contextlib.nullcontext
    collate = kind_for(model).collate  # the layout of the model's kind (encoder–decoder, images ...)
    bar = progress_bar(len(pairs), "reference log-probs")
    try:
        with torch.no_grad(), ctx():
            for start in range(0, len(pairs), batch_size):
                batch = collate(pairs[start:start + batch_size], share_prompt=True, padding_free=True)
                batch = {k: v.to(device) for k, v in batch.items()}
                out = sequence_logps(model, batch, chunk_size)
                chosen.append(out.chosen_logps.double().cpu())
                rejected.append(out.rejected_logps.double().cpu())
                bar.update(min(batch_size, len(pairs) - start))
                fault_point("reference")
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def _load_cache(path: Path) -> dict[str, tuple[float, float]]:
    """The cache file's ``{pair key: (chosen, rejected)}``; ``{}`` (with a warning) when it is missing,
    unreadable, or not that shape. Loaded with ``weights_only=True``: plain containers and numbers
    only, so a crafted file cannot run code."""
    if not path.exists():
        return {}
    try:
        values = torch.load(path, weights_only=True)
    except Exception:  # a broken (or hostile) cache file is recomputed, never trusted
        logger.warning("ignoring unreadable reference cache %s", path)
        return {}
    if not isinstance(values, dict) or not all(
            isinstance(k, str) and isinstance(v, (tuple, list)) and len(v) == 2 for k, v in values.items()):
        logger.warning("ignoring reference cache %s: not a mapping of pair keys to two log-probs", path)
        return {}
    return values


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive ``fcntl`` lock on ``path`` (created), held for the ``with`` block."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _merge_into_cache(path: Path, new: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Add ``new`` to the cache file under its lock (read, merge, write a temporary file, rename), so
    concurrent runs sharing the cache never lose each other's entries nor leave a partial file.
    Returns the merged mapping; a cache that cannot be written is a warning, not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path.with_suffix(".lock")):
            merged = {**_load_cache(path), **new}
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(merged, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            fault_point("reference_write")
            os.replace(tmp, path)
        return merged
    except OSError as exc:
        logger.warning("could not write the reference cache %s (%s); continuing without it", path, exc)
        return new


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

    The cache holds one file per reference policy (``model_key``: model, adapter, dtype, mixed
    precision), mapping each pair's token ids (:func:`pair_key`) to its two sums, so a later run
    on other splits, or ``preftune evaluate`` on the eval split, reuses whatever was computed;
    only missing pairs are computed. A model whose sums are LD-DPO's (``--ld_alpha``,
    :func:`preftune.engine.forward.configure_sequence_outputs`) has its own cache file per ``ld_alpha``. Returns ``"cache"`` (all found), ``"computed"`` (none found)
    or ``"cache+computed"``.

    Several processes (a ``torch.distributed`` process group, every rank calling this with the same
    ``pairs``): the missing pairs (the union of what each rank's read of the cache lacks) are split
    over the ranks, each computes its share, and the values are gathered, so every rank gets every
    pair's values and each pair is computed once; only the main process writes the cache.
    """
    if not pairs:
        return "computed"
    ld_alpha = sequence_outputs(model).ld_alpha  # LD-DPO's sums are other numbers: their own cache file
    path = model_cache_path(model_key if ld_alpha is None else f"{model_key}|ld_alpha={ld_alpha!r}", cache_dir)
    cached = _load_cache(path)
    keys = [pair_key(p) for p in pairs]
    missing = [i for i, k in enumerate(keys) if k not in cached]
    ranks = distributed.world_size()
    if ranks > 1:  # every rank works on the same list (another run may have written between two reads)
        missing = sorted(set().union(*distributed.gather_objects(missing)))
    if missing:
        mine = distributed.shard(missing)
        computed: dict[str, tuple[float, float]] = {}
        with distributed.full_parameters(model):  # ZeRO-3: weights partitioned at load, gathered for this pass
            if mine:
                c, r = compute_reference_logps(model, [pairs[i] for i in mine], reference_context=reference_context,
                                               batch_size=batch_size, chunk_size=chunk_size)
                computed = {keys[i]: (ci, ri) for i, ci, ri in zip(mine, c.tolist(), r.tolist())}
        if ranks > 1:
            for part in distributed.gather_objects(computed):
                computed.update(part)
        cached.update(computed)
        if is_main_process():  # only rank 0 writes; another run may have added entries meanwhile
            cached.update(_merge_into_cache(path, computed))
    for p, k in zip(pairs, keys):
        p.ref_chosen_logps, p.ref_rejected_logps = cached[k]
    source = "computed" if len(missing) == len(pairs) else "cache" if not missing else "cache+computed"
    logger.info("reference log-probs for %d pairs: %s (%d computed%s, %s)", len(pairs), source, len(missing),
                f" over {ranks} processes" if ranks > 1 and missing else "", path)
    return source
