"""Atomic files, completeness markers and finding the newest complete checkpoint (:mod:`preftune.outputs`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Optional

from preftune.distributed import is_main_process  # noqa: F401  (re-exported)
from preftune.errors import ConfigError

logger = logging.getLogger("preftune.outputs")

MARKER = "preftune_complete.json"
LOCK_NAME = ".preftune.lock"
PARTIAL_PREFIX = ".partial-"
CRC_LIMIT = 64 << 20  # files up to 64 MiB get a CRC-32 in the marker (adapters, optimiser of LoRA, states)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_IGNORED = {LOCK_NAME, ".gitkeep", ".gitignore", ".DS_Store"}
# files that make a directory "a run" (safe to clear with --overwrite_output_dir)
_RUN_FILES = {"preftune_config.yaml", "trainer_state.json", "train_results.json", "all_results.json",
              "adapter_config.json", "adapter_model.safetensors", "model.safetensors", "data_report.txt", MARKER}

# ---- atomic files --------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_table(directory: Path) -> dict[str, list]:
    table = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MARKER:
            size = p.stat().st_size
            table[p.relative_to(directory).as_posix()] = [size, _crc32(p) if size <= CRC_LIMIT else None]
    return table


def write_marker(directory: str | os.PathLike, kind: str, **info: Any) -> None:
    """Write the completeness marker of ``directory`` (every file, its size and CRC-32), last."""
    directory = Path(directory)
    for p in directory.rglob("*"):  # the files' data reach the disk before the marker does
        if p.is_file():
            with contextlib.suppress(OSError), open(p, "rb") as fh:
                os.fsync(fh.fileno())
    marker = {"kind": kind, "time": time.time(), **info, "files": _file_table(directory)}
    atomic_write_text(directory / MARKER, json.dumps(marker, indent=1))


def verify_complete(directory: str | os.PathLike) -> Optional[str]:
    """None when ``directory`` holds a marker and every file it lists, unchanged; else the reason."""
    directory = Path(directory)
    try:
        marker = json.loads((directory / MARKER).read_text())
        files = marker["files"]
    except FileNotFoundError:
        return f"no {MARKER} (a partial write, or written by another tool)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MARKER} ({exc})"
    for name, (size, crc) in files.items():
        p = directory / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, {size} were written"
        if crc is not None and _crc32(p) != crc:
            return f"{name} is corrupted (CRC-32 differs from the one written)"
    return None


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the complete directory ``src`` to ``dst`` (replacing an older ``dst``)."""
    old = None
    if dst.exists():
        old = dst.with_name(f"{PARTIAL_PREFIX}old-{dst.name}-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- checkpoints ---------------------------------------------------------------------------------
def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` directories of ``output_dir``, newest (largest N) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, key=lambda x: -x[0])]


def latest_complete_checkpoint(output_dir: str | os.PathLike, warn: bool = True) -> Optional[str]:
    """The newest ``checkpoint-N`` of ``output_dir`` that passes :func:`verify_complete`; each newer
    one that does not is skipped (with a warning when ``warn``). None when there is none."""
    for ckpt in checkpoint_dirs(output_dir):
        reason = verify_complete(ckpt)
        if reason is None:
            return str(ckpt)
        if warn:
            logger.warning("skipping %s: incomplete or corrupted checkpoint (%s); never loaded", ckpt, reason)
    return None


LATEST = ("latest", "true", "True")


def resolve_checkpoint(value: Optional[str], output_dir: str) -> Optional[str]:
    """``latest`` → :func:`latest_complete_checkpoint` (None, with a warning, when the run was killed
    before its first complete checkpoint: it starts again from step 0); a path → itself (verified
    when it has a marker); None / ``false`` → None.

    Raises ``FileNotFoundError`` when the path is missing, :class:`ConfigError` when the path's
    marker shows an incomplete or corrupted write.
    """
    if value in (None, "", "false", "False", "no"):
        return None
    if value in LATEST:
        last = latest_complete_checkpoint(output_dir)
        if last is None:
            found = len(checkpoint_dirs(output_dir))
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint-* in %s%s; training starts "
                           "from step 0", output_dir, f" ({found} incomplete or corrupted)" if found else "")
        return last
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint directory")
    if (path / MARKER).exists():
        reason = verify_complete(path)
        if reason:
            raise ConfigError(f"--resume_from_checkpoint {value}: incomplete or corrupted checkpoint ({reason})")
    else:
        logger.warning("%s has no %s (written by another tool or an older preftune): loading it unchecked",
                       path, MARKER)
    return value
