"""bench/gpucheck.py (scripts/gpu-check.sh): the summary's verdict, MFU's inputs, budgets.

The dry run itself (`--device cpu --quick`, every part in real processes) is `make
gpu-check-dry`, a prerequisite of `make test`; here are the pieces it relies on, each
able to fail. Nothing here needs a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from ditserve.bench import gpucheck
from ditserve.bench.forward import forward_flops
from ditserve.model import dit_config


def test_dit_xl_2_at_256_px_is_237_gflop_per_row():
    assert forward_flops(dit_config("DiT-XL/2", input_size=32)) / 1e9 == pytest.approx(237.2,
                                                                                       abs=0.1)


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("Tesla T4", None)])
def test_peaks_match_the_most_specific_name(name, peak):
    assert gpucheck.peak_tflops(name) == peak


def test_the_full_check_fits_eight_minutes():
    assert sum(gpucheck.Settings().budgets.values()) <= 8 * 60 - 30  # 30 s for the install
    assert set(gpucheck.Settings().budgets) == set(gpucheck.PARTS)
    assert sum(gpucheck.Settings.quick().budgets.values()) <= 10 * 60  # limits, not the time


def _summary(folder, statuses: dict[str, str]) -> None:
    for part in statuses:
        (folder / f"{part}.json").write_text("{}")
    parts = {p: {"status": s, **({"error": "boom"} if s != "ok" else {})}
             for p, s in statuses.items()}
    (folder / "summary.json").write_text(json.dumps({"parts": parts}))


def test_the_check_passes_only_when_every_part_is_there_and_ok(tmp_path):
    _summary(tmp_path, dict.fromkeys(gpucheck.PARTS, "ok"))
    assert gpucheck.check(tmp_path / "summary.json") == []
    _summary(tmp_path, {**dict.fromkeys(gpucheck.PARTS, "ok"), "forward": "timeout"})
    assert gpucheck.check(tmp_path / "summary.json") == ["part forward: timeout: boom"]
    (tmp_path / "diffusers.json").unlink()
    _summary(tmp_path, {p: "ok" for p in gpucheck.PARTS if p != "diffusers"})
    assert gpucheck.check(tmp_path / "summary.json") == ["part diffusers: missing",
                                                         "part diffusers: no diffusers.json"]
    assert gpucheck.check(tmp_path / "nothing.json") == [f"{tmp_path / 'nothing.json'} is missing"]


def test_transport_availability_follows_the_pipeline_config():
    import dataclasses

    from ditserve.config import PipelineConfig

    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    assert gpucheck.transport_available() == ("transport" in names)


def test_one_part_writes_its_json(tmp_path):
    """A part runs in its own process and writes NAME.json with its verdict."""
    subprocess.run([sys.executable, "-m", "ditserve.bench.gpucheck", "--part", "parity",
                    "--device", "cpu", "--quick", "--out", str(tmp_path)], check=True,
                   timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads((tmp_path / "parity.json").read_text())
    assert result["ok"] is True and 0 < result["scaled_error"] <= gpucheck.PARITY_BOUND
    assert result["compare"] == "cpu/bf16 vs cpu/float32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal without a GPU")
def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ditserve.bench.gpucheck", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("gpu-check: no CUDA device here; --device cpu --quick "
                                     "is the dry run")


def test_the_check_refuses_more_files_than_the_device_tool_brings_back(tmp_path):
    _summary(tmp_path, dict.fromkeys(gpucheck.PARTS, "ok"))
    (tmp_path / gpucheck.LOGS_FILE).write_text("logs")
    assert gpucheck.check(tmp_path / "summary.json") == []  # 6 files
    (tmp_path / "deeper").mkdir()
    (tmp_path / "deeper" / "stage.log").write_text("")
    assert "brings back at most 8" in gpucheck.check(tmp_path / "summary.json")[0]
    (tmp_path / "deeper" / "stage.log").unlink()
    for k in range(3):
        (tmp_path / f"extra-{k}.json").write_text("{}")
    assert gpucheck.check(tmp_path / "summary.json") == [
        f"9 files under {tmp_path}: the device tool brings back at most 8, all in that folder"]


def test_each_variant_records_and_checks_the_path_its_hops_took():
    log = ("ts=1 level=INFO service=stage-0 event=data_path peer=stage-1 path=shm "
           "transport=shm reason=\"peer down\"\n"
           "ts=2 level=INFO service=stage-0 event=data_path peer=stage-1 path=cuda_ipc "
           "transport=shm reason=-\n")
    assert gpucheck.stream_path(log) == "cuda_ipc"  # the stream in use: the last one
    assert gpucheck.stream_path("event=next_hop_connected") is None
    assert gpucheck.expected_path("shm", "cuda") == "cuda_ipc"  # what a GPU run proves
    assert gpucheck.expected_path("shm", "cpu") == "cuda_ipc"  # the dry run: HANDOFF_CPU
    assert gpucheck.expected_path("grpc", "cuda:0") == "grpc"
    assert gpucheck.expected_path(None, "cuda") is None


def test_a_transport_whose_latents_differ_fails_its_variant(tmp_path, monkeypatch):
    """A hop that hands over wrong activations (stale, unsynchronised, foreign memory)
    must fail the pipelines part, not only be timed: same seed, same stages, so every
    transport's latents must match the first one's."""
    def fake_pipeline(latents_of: dict[str, torch.Tensor]):
        async def pipeline(s, config, path, stages, transport, folder):
            return {"step_ms_one_request": 1.0, "images_per_s": 1.0,
                    "latents": latents_of[transport]}
        return pipeline

    good = torch.randn(1, 4, 8, 8)
    s = gpucheck.Settings.quick()
    s.stage_counts = (2,)
    monkeypatch.setattr(gpucheck, "_pipeline", fake_pipeline({"grpc": good, "shm": good}))
    result = gpucheck.part_pipelines(s, tmp_path)
    assert result["ok"] and result["variants"][1]["latents_error"] == 0.0
    assert "latents" not in result["variants"][1]  # no tensor in the JSON

    stale = good + 0.1 * good.abs().max() * torch.randn_like(good)
    monkeypatch.setattr(gpucheck, "_pipeline", fake_pipeline({"grpc": good, "shm": stale}))
    result = gpucheck.part_pipelines(s, tmp_path)
    assert not result["ok"] and result["variants"][1]["status"] == "failed"
    assert "latents differ from grpc's" in result["error"]
    nan = torch.full_like(good, float("nan"))
    monkeypatch.setattr(gpucheck, "_pipeline", fake_pipeline({"grpc": good, "shm": nan}))
    assert not gpucheck.part_pipelines(s, tmp_path)["ok"]


def test_the_dry_runs_shm_variant_takes_the_handoff_path_the_gpu_run_takes(tmp_path,
                                                                            tiny_checkpoint):
    """`transport: shm` must take cuda_ipc on either device: CUDA IPC handles between
    CUDA stages, the same protocol over CPU shared memory between the dry run's CPU
    stages, so `make test` runs the handoff code (probe, handles, ledger, outputs kept
    on the device) that the GPU run depends on."""
    for device, handoff in (("cpu", list(gpucheck.HANDOFF_CPU)), ("cuda", [])):
        s = gpucheck.Settings.quick(device)
        [stage] = gpucheck._stage_processes(s, tiny_checkpoint, 1, "shm", tmp_path)
        argv = list(stage.argv)
        assert argv[argv.index("--threads") + 2:] == handoff  # CUDA stages: real CUDA IPC
