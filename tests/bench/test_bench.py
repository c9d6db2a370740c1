"""Smoke tests of `ditserve bench`: every scenario runs in its --quick tiny mode and writes
valid JSON and a Markdown table. Not timing assertions: the figures are not checked, only
that the harness measures what it says (rows per variant, bytes close to theory)."""

from __future__ import annotations

import json

import pytest
import torch
from ditserve.cli import main

SCENARIOS = ("distribution", "throughput", "load", "peer", "wire", "transport", "memory",
             "forward")


def _bench(scenario: str, out_dir, *extra: str) -> dict:
    assert main(["bench", scenario, "--quick", "--out-dir", str(out_dir), *extra]) == 0
    data = json.loads((out_dir / f"{scenario}.json").read_text())
    table = (out_dir / f"{scenario}.md").read_text()
    assert data["scenario"] == scenario and data["summary"] and data["samples"]
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"] == torch.__version__
    assert data["command"].startswith(f"ditserve bench {scenario}")
    header = next(line for line in table.splitlines() if line.startswith("| "))
    assert "|---|" in table and table.count("\n| ") >= len(data["summary"])
    assert header.count("|") >= 3
    return data


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every scenario once (quick), sharing one output folder."""
    out = tmp_path_factory.mktemp("bench")
    return {s: _bench(s, out) for s in SCENARIOS}, out


def test_every_scenario_writes_json_and_markdown(results):
    _, out = results
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}.{ext}" for s in SCENARIOS for ext in ("json", "md"))


def test_distribution_compares_monolith_and_each_chain(results):
    rows = results[0]["distribution"]["summary"]
    assert [r["variant"] for r in rows] == ["monolith", "2 stages"]
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] > 0


def test_throughput_reports_utilisation_per_stage(results):
    rows = results[0]["throughput"]["summary"]
    two = next(r for r in rows if r["variant"] == "2 stages")
    assert len(two["utilisation"].split(" / ")) == 2
    assert 0.0 <= two["bubble"] <= 1.0
    assert {r["clients"] for r in rows} == {1, 4}


def test_peer_runs_diffusers_and_ditserve(results):
    names = {r["variant"] for r in results[0]["peer"]["summary"]}
    assert {"diffusers, one call per request", "diffusers, one batched call",
            "ditserve monolith", "ditserve 2 stages"} <= names


def test_wire_bytes_match_theory_plus_conditioning(results):
    hop = results[0]["wire"]["summary"][0]
    # T=16, D=64: c adds D/(T·D) = 1/16 to the bf16 tokens
    assert hop["ratio"] == pytest.approx(1 + 1 / 16, rel=0.02)


def test_transport_compares_raw_grpc_each_transport_and_memcpy(results):
    everything = results[0]["transport"]["summary"]  # quick: DiT-S/2, 1 row, 2 stages
    rows = [r for r in everything if not r["path"].startswith("ladder")]
    paths = {r["path"] for r in rows}
    assert paths == {"raw grpc.aio bytes", "raw grpc.aio 128-byte message", "ditserve grpc",
                     "ditserve shm", "memcpy (torch copy_)"}
    for row in rows:
        assert row["hop_ms"] is None or row["hop_ms"] > 0
        assert (row["gb_per_s"] or 0) > 0 or row["path"].endswith("message")
    # The baseline of an S-stage chain is a raw relay chain of the same S (2 here).
    assert {r["stages"] for r in rows if r["path"].startswith("raw")} == {2}
    shm = [r for r in rows if r["path"] == "ditserve shm"]
    assert shm[0]["negotiated"] == "shm"  # the probe proved the memory shared on one host
    grpc_rows = [r for r in rows if r["path"] == "ditserve grpc"]
    assert grpc_rows[0]["negotiated"] == "grpc" and all(r["vs_raw"] for r in grpc_rows)


def test_transport_ladder_climbs_from_raw_to_the_stage_on_one_hop(results):
    """Each rung ran (its calls were answered: a bare server that mis-framed its replies
    would fail the StageClient's rung), one hop at one in flight, against its own raw."""
    ladder = [r for r in results[0]["transport"]["summary"] if r["path"].startswith("ladder")]
    assert [r["path"] for r in ladder] == [
        "ladder 1: raw grpc.aio bytes", "ladder 2: lean frames, bare server",
        "ladder 3: StageClient, bare server", "ladder 4: StageClient, relay stage"]
    assert all(r["stages"] == 1 and r["in_flight"] == 1 and r["hop_ms"] > 0 for r in ladder)
    assert ladder[0]["vs_raw"] == 1 and all(r["vs_raw"] > 0 for r in ladder)
    samples = results[0]["transport"]["samples"]
    assert len(samples["ladder 3: StageClient, bare server S=1 N=1 k=1"]["latencies_s"]) >= 3


def test_load_reports_utilisation_per_stage_at_each_concurrency(results):
    rows = results[0]["load"]["summary"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert all(len(r["utilisation"].split(" / ")) == 2 for r in rows)


def test_memory_measures_each_stage_and_the_floor(results):
    parts = [r["stage"] for r in results[0]["memory"]["summary"]]
    assert parts == ["whole", "0/2", "1/2", "torch import only"]


def test_unknown_setting_is_a_one_line_error(tmp_path, capsys):
    assert main(["bench", "wire", "--quick", "--set", "nonsense=1", "--out-dir", str(tmp_path)]) == 2
    assert "has no setting 'nonsense'" in capsys.readouterr().err


def test_gpu_without_cuda_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu", "--quick", "--out-dir", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_the_gpu_scenarios_monolith_runs_on_the_gpu_in_bf16(monkeypatch, tiny_model,
                                                            tiny_checkpoint):
    """`bench gpu` passes device="cuda": the monolith must be built there (from the
    checkpoint, in the stages' bf16), not on the CPU float32 model it was given."""
    import asyncio
    from contextlib import AsyncExitStack

    from ditserve.bench import chains

    built = []
    real = chains.TimedLocalChain.from_checkpoint.__func__

    def from_checkpoint(cls, path, *args, device="cpu", dtype=torch.float32, **options):
        built.append((str(path), device, dtype))  # built on the CPU here: no GPU to use
        return real(cls, path, *args, **options)

    monkeypatch.setattr(chains.TimedLocalChain, "from_checkpoint", classmethod(from_checkpoint))

    async def monolith(device: str) -> chains.Variant:
        async with AsyncExitStack() as stack:
            [variant] = await chains.open_variants(stack, tiny_model, tiny_checkpoint, (), {},
                                                   device)
            return variant

    assert asyncio.run(monolith("cuda")).name == "monolith"
    assert built == [(str(tiny_checkpoint), "cuda", torch.bfloat16)]
    asyncio.run(monolith("cpu"))  # the CPU scenarios keep the model they were given
    assert len(built) == 1


def test_ditserves_latents_decode_through_a_bf16_vae():
    """On a GPU the peer scenario's VAE is bf16 (with diffusers' pipeline); ditserve's
    latents arrive in float32 and must be cast to it, not fed to it as they are."""
    from ditserve.bench.peer import decode, small_vae

    vae = small_vae().to(torch.bfloat16)
    images = decode(vae, torch.randn(1, 4, 4, 4))
    assert images.shape == (1, 3, 32, 32) and images.dtype == torch.bfloat16


def test_models_flag_of_a_one_model_scenario_takes_one_model(tmp_path, capsys):
    assert main(["bench", "peer", "--quick", "--models", "DiT-S/2,DiT-B/2",
                 "--out-dir", str(tmp_path)]) == 2
    assert "measures one model" in capsys.readouterr().err
