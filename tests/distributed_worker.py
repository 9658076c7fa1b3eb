"""Run by ``tests/test_distributed.py`` under ``torchrun``: several ``preftune train`` runs in one
launch (a launch costs seconds of start-up), each through the CLI's ``main``, with a per-rank audit
of the files every process creates, writes, renames or removes.

``python distributed_worker.py SPEC.json``: SPEC holds ``{"runs": [[argv...], ...], "audit_dir": DIR}``;
rank R writes ``DIR/rank{R}.json`` (the written paths, in order) at the end. The audit uses
``sys.addaudithook`` (Python-level ``open`` for writing, ``os.open`` with write flags, mkdir,
rename/replace, remove, rmtree); files written by native code that bypasses Python's ``open`` are
not seen (safetensors' writer), which the main process alone calls here anyway.
"""

from __future__ import annotations

import json
import os
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_written: list[str] = []
_recording = True


def _hook(event: str, args: tuple) -> None:
    if not _recording:
        return
    path = None
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            (isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writes:
            path = args[0]
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate") and args:
        path = args[0]
    elif event == "os.rename" and len(args) > 1:
        path = args[1]
    if path is not None and not isinstance(path, int):
        _written.append(os.path.abspath(os.fsdecode(path)))


def main() -> int:
    global _recording
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    audit_dir = spec["audit_dir"]
    sys.addaudithook(_hook)
    from preftune.cli import main as cli

    status = 0
    for argv in spec["runs"]:
        status = cli(list(argv))
        if status:
            break
    _recording = False
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(audit_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(_written, fh)
    return status


if __name__ == "__main__":
    sys.exit(main())
