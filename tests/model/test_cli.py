"""`ditserve convert` and `ditserve inspect` as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import torch
from ditserve.model import open_checkpoint


def _ditserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ditserve.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_convert_then_inspect(tmp_path, official_pt):
    out = tmp_path / "tiny.safetensors"
    converted = _ditserve("convert", str(official_pt), "--out", str(out))
    assert converted.returncode == 0, converted.stderr
    assert open_checkpoint(out).config.name == "DiT-Tiny/2"
    inspected = _ditserve("inspect", str(out), "--stages", "2")
    assert inspected.returncode == 0, inspected.stderr
    lines = inspected.stdout.splitlines()
    assert any(line.startswith("parameters  331,552") for line in lines), inspected.stdout
    stages = [line for line in lines if line.startswith("stage ")]
    assert [s.split()[3] for s in stages] == ["0:2", "2:4"]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    missing = _ditserve("inspect", str(tmp_path / "nope.pt"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "does not exist" in missing.stderr
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    wrong = _ditserve("convert", str(tmp_path / "x.pt"), "--out", str(tmp_path / "y.bin"))
    assert wrong.returncode == 2 and "--out must end in .safetensors" in wrong.stderr


def test_a_text_file_is_one_line_naming_it_and_the_formats(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, not weights\n")
    for argv in (["inspect", str(notes)], ["convert", str(notes), "--out", str(tmp_path / "o.safetensors")],
                 ["stage", "--checkpoint", str(notes), "--stage", "0", "--stages", "1",
                  "--listen", "127.0.0.1:1"]):
        done = _ditserve(*argv)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"{notes}: not a loadable torch checkpoint" in done.stderr
        assert "accepted: an official .pt" in done.stderr
        assert "diffusers DiT folder" in done.stderr and ".safetensors" in done.stderr
