"""Names of ditserve's shared-memory segments, and the removal of those a killed sender
left behind (wire/shm.py explains when that happens). Torch-free, so the launcher can
sweep without importing the wire codec."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "ditserve-"
NAME = re.compile(r"ditserve-([0-9]+)-[0-9a-f]{16}")
"""A segment's name: the creator's pid, then 16 random hex digits."""
ORPHAN_AGE_S = 60.0
"""Age after which a named segment of a pid that does not exist is an orphan: an offer
is answered in milliseconds, and a stream that never gets its answer gives up after 5 s."""


def leftover_segments(directory: Path = SHM_DIR) -> list[Path]:
    """ditserve segments in `directory` that still have a name."""
    return sorted(directory.glob(f"{PREFIX}*")) if directory.is_dir() else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def remove_orphans(directory: Path = SHM_DIR, pids: Sequence[int] | None = None,
                   min_age_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Unlinks the ditserve segments left by dead senders; returns them. With `pids`, the
    segments of those pids (the caller knows they are dead: a supervisor that reaped them),
    whatever their age; without, those of any pid that no longer exists, once older than
    `min_age_s`."""
    removed = []
    now = time.time()
    for path in leftover_segments(directory):
        match = NAME.fullmatch(path.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pids is not None:
            if pid not in pids:
                continue
        else:
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue  # mapped and unlinked by its receiver meanwhile
            if age < min_age_s or _pid_alive(pid):
                continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
