"""A test-only fault hook: kill the process at a named point (``tests/test_reliability.py``).

``PREFTUNE_FAULT=checkpoint_write:2`` makes the process kill itself with SIGKILL the second time it
reaches the ``checkpoint_write`` point. Without the variable :func:`fault_point` costs one
dictionary lookup. Imports nothing from preftune, so every writer may call it.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Optional

logger = logging.getLogger("preftune.faults")

_FAULTS: Optional[dict[str, int]] = None
_FAULT_COUNTS: dict[str, int] = {}


def _parse_faults(spec: str) -> dict[str, int]:
    faults = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, count = item.partition(":")
        faults[name] = int(count or 1)
    return faults


def fault_point(name: str) -> None:
    """Test hook: SIGKILL this process the N-th time it reaches ``name`` when
    ``$PREFTUNE_FAULT`` holds ``name:N`` (comma-separated for several points).

    Points: ``step`` (after the backward, before the optimiser step), ``checkpoint_write`` (the
    checkpoint is written to its temporary directory, not yet renamed), ``reference`` (after a
    batch of the reference pass), ``reference_write`` (reference cache written, not renamed),
    ``final_save`` (final files written to the staging directory, not yet moved).
    """
    global _FAULTS
    if _FAULTS is None:
        _FAULTS = _parse_faults(os.environ.get("PREFTUNE_FAULT", ""))
    if name not in _FAULTS:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == _FAULTS[name]:
        logger.warning("PREFTUNE_FAULT: killing the process at %s #%d", name, _FAULT_COUNTS[name])
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
