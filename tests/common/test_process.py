"""The one helper that starts service processes (launcher, benchmarks, demo, tests): free
ports, a start failure named with its cause, stop = SIGTERM then SIGKILL, and no child left
behind when its parent dies."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import is_alive
from ditserve.common.process import (
    ServiceFailed,
    ServiceProcess,
    free_port_block,
    stop_all,
)


def test_a_free_port_block_is_free_and_consecutive():
    base = free_port_block(4)
    for port in range(base, base + 4):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_process_that_dies_while_starting_is_named_with_its_cause(tmp_path, free_port):
    code = "import sys; print('loading'); sys.exit('ditserve stage: checkpoint x does not exist')"
    process = ServiceProcess("stage-3", (sys.executable, "-c", code),
                             f"127.0.0.1:{free_port()}", tmp_path / "stage-3.log").start()
    with pytest.raises(ServiceFailed) as failed:
        process.wait_serving(timeout=60)
    process.close()
    assert str(failed.value) == ("stage-3 failed to start: exit code 1: "
                                 "ditserve stage: checkpoint x does not exist")
    assert failed.value.log_tail == ["loading", "ditserve stage: checkpoint x does not exist"]


def test_stop_terminates_then_kills_what_ignores_sigterm(tmp_path):
    polite = ServiceProcess("polite", (sys.executable, "-c", "import time; time.sleep(60)"),
                            "127.0.0.1:1", tmp_path / "polite.log").start()
    stubborn_code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                     "print('ready', flush=True); time.sleep(60)")
    stubborn = ServiceProcess("stubborn", (sys.executable, "-c", stubborn_code), "127.0.0.1:1",
                              tmp_path / "stubborn.log").start()
    while "ready" not in stubborn.log():  # its SIGTERM handler is in place
        time.sleep(0.05)
    never = ServiceProcess("never", (sys.executable, "-c", "pass"), "127.0.0.1:1",
                           tmp_path / "never.log")
    assert stop_all([polite, stubborn, never], grace=1.0) == [-signal.SIGTERM, -signal.SIGKILL,
                                                              None]


def test_a_child_does_not_outlive_its_killed_parent(tmp_path):
    """The parent-death signal: SIGKILL the parent, the service gets SIGTERM."""
    parent_code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from ditserve.common.process import ServiceProcess
        child = ServiceProcess("child", (sys.executable, "-c", "import time; time.sleep(120)"),
                               "127.0.0.1:1", Path({str(tmp_path / 'child.log')!r})).start()
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30  # a bound on a hang, not a timing assertion
    while is_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(child)
