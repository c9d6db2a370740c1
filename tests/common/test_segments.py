"""Segments a sender killed before its peer mapped them (wire/shm.py's one window): found
by the pid in their name and removed, and nobody else's are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ditserve.common.segments import leftover_segments, remove_orphans
from ditserve.wire.shm import ShmRing

# A sender that creates its ring and is killed before it could offer it:
_KILLED_SENDER = ("import os, sys; from pathlib import Path; from ditserve.wire.shm import ShmRing; "
                  "ring = ShmRing(4096, 2, Path(sys.argv[1])); print(ring.name, flush=True); "
                  "os.kill(os.getpid(), 9)")


def _killed_sender(directory: Path) -> tuple[str, int]:
    """The name of the segment a SIGKILLed sender left in `directory`, and its pid."""
    proc = subprocess.run([sys.executable, "-c", _KILLED_SENDER, str(directory)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc.stdout.strip(), int(proc.stdout.split("-")[1])


def test_a_killed_senders_segment_outlives_it_until_removed(tmp_path):
    name, _ = _killed_sender(tmp_path)
    assert [p.name for p in leftover_segments(tmp_path)] == [name]  # the leak, shown
    assert remove_orphans(tmp_path) == []  # too young: it might be an offer in flight
    assert [p.name for p in remove_orphans(tmp_path, min_age_s=0)] == [name]
    assert leftover_segments(tmp_path) == []


def test_a_live_senders_segment_is_kept_and_a_new_ring_sweeps_old_orphans(tmp_path):
    orphan, _ = _killed_sender(tmp_path)
    old = os.stat(tmp_path / orphan).st_mtime - 3600
    os.utime(tmp_path / orphan, (old, old))  # an hour old
    live = ShmRing(4096, 1, tmp_path)  # creating a ring sweeps the old orphan
    try:
        os.utime(live.path, (old, old))
        assert [p.name for p in leftover_segments(tmp_path)] == [live.name]
        assert remove_orphans(tmp_path, min_age_s=0) == []  # its pid (ours) is alive
    finally:
        live.close()


def test_removing_by_pid_removes_only_that_pids(tmp_path):
    first, first_pid = _killed_sender(tmp_path)
    second, _ = _killed_sender(tmp_path)
    assert [p.name for p in remove_orphans(tmp_path, pids=[first_pid])] == [first]
    assert [p.name for p in leftover_segments(tmp_path)] == [second]
