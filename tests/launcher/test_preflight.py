"""`ditserve up` with an input that cannot work: one line naming it, exit status 2, no
traceback, and nothing started (no run folder). A service that fails at start anyway is
named with its cause and the end of its log, and the others are stopped (issue 11 §2)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_base_port
from ditserve.launcher.preflight import SERVER_MODULES


def _up(*args: str, log_dir: Path, python_prefix: tuple[str, ...] = ("-m", "ditserve.cli"),
        timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [sys.executable, *python_prefix, "up", *args, "--log-dir", str(log_dir)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _one_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def bad_inputs(tmp_path: Path, tiny_checkpoint: Path) -> dict[str, tuple[list[str], str]]:
    """name → (arguments, what the error line must say)."""
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    no_vae = tmp_path / "empty-vae"
    no_vae.mkdir()
    return {
        "missing checkpoint": (["--checkpoint", str(tmp_path / "nope.pt")],
                               f"ditserve up: checkpoint {tmp_path / 'nope.pt'} does not exist"),
        # The wording is the checkpoint reader's; up's part is that it comes first, alone.
        "text file as checkpoint": (["--checkpoint", str(text)], f"ditserve up: {text}: not a "),
        "more stages than blocks": (["--checkpoint", str(tiny_checkpoint), "--stages", "20"],
                                    "ditserve up: --stages 20: the model at "
                                    f"{tiny_checkpoint} has only 4 blocks, so at most 4 stages"),
        "bad vae": (["--checkpoint", str(tiny_checkpoint), "--vae", str(no_vae)],
                    f"ditserve up: --vae {no_vae}: no config.json in it"),
    }


@pytest.mark.parametrize("case", ["missing checkpoint", "text file as checkpoint",
                                  "more stages than blocks", "bad vae"])
def test_a_bad_input_is_one_line_before_anything_starts(case, bad_inputs, tmp_path):
    args, expected = bad_inputs[case]
    line = _one_line(_up(*args, "--port", str(free_base_port(4)), log_dir=tmp_path / "logs"))
    assert line.startswith(expected), line
    assert not (tmp_path / "logs").exists()


def test_a_port_held_by_another_program_is_named(tmp_path, tiny_checkpoint):
    base = free_base_port(4)
    with socket.socket() as other:  # not a gRPC server: plain bind + listen
        other.bind(("127.0.0.1", base + 2))
        other.listen()
        line = _one_line(_up("--checkpoint", str(tiny_checkpoint), "--port", str(base),
                             log_dir=tmp_path / "logs"))
    assert line == (f"ditserve up: stage-0 cannot listen on 127.0.0.1:{base + 2}: port "
                    f"{base + 2} is already in use (choose other ports with --port)")
    assert not (tmp_path / "logs").exists()


def test_on_a_client_only_install_up_says_what_to_install(tmp_path):
    """The server extras made unimportable, as on `pip install ditserve` without extras
    (it died with ModuleNotFoundError: grpc_health)."""
    shim = ("import sys\n"
            f"for name in {SERVER_MODULES!r}:\n"
            "    sys.modules[name] = None  # import fails, find_spec answers None\n"
            "from ditserve.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    line = _one_line(_up("--port", str(free_base_port(4)), log_dir=tmp_path / "logs",
                         python_prefix=("-c", shim)))
    assert line.startswith("ditserve up: serving needs the server extras: "
                           "pip install 'ditserve[server]' (missing: torch,"), line


def test_a_service_failing_at_start_is_named_with_its_log(tmp_path, tiny_checkpoint):
    """The VAE folder passes the pre-flight check but cannot be loaded: the decoder dies
    while starting. One line names it and the cause, the end of its log follows, the stage
    that did start is stopped (this was a RuntimeError traceback, then an AttributeError
    from stop_all)."""
    vae = tmp_path / "broken-vae"
    vae.mkdir()
    (vae / "config.json").write_text("{ not json")
    done = _up("--checkpoint", str(tiny_checkpoint), "--stages", "1", "--vae", str(vae),
               "--port", str(free_base_port(3)), log_dir=tmp_path / "logs", timeout=240)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.splitlines()  # the launcher's log lines, then the report
    first = next(i for i, line in enumerate(lines) if line.startswith("ditserve up:"))
    assert lines[first].startswith("ditserve up: decoder failed to start: exit code "), done.stderr
    (run_dir,) = (tmp_path / "logs").iterdir()
    assert lines[first + 1] == f"  last lines of {run_dir / 'decoder.log'}:"
    assert "cannot read the VAE config" in lines[first], done.stderr  # the decoder's own words
    assert lines[first + 2].startswith("    "), done.stderr
    assert "AttributeError" not in done.stderr
    assert "stopped 1 services" in done.stderr  # the stage, which had started
