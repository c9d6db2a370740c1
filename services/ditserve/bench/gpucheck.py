"""The prepared GPU check behind scripts/gpu-check.sh: one JSON per part and a summary.

    python -m ditserve.bench.gpucheck --device cuda --out DIR          # ≤ 8 min on one H100
    python -m ditserve.bench.gpucheck --device cpu --quick --out DIR   # the dry run (make test)

Parts, each in its own process with its own time budget (a part that fails or runs out of
time records why; the others still run):

- parity:    DiT-XL/2 (random weights) in bf16 on the device vs float32 on the CPU;
- forward:   forward ms and MFU at batch 1, 8, 32, 64, eager vs CUDA graphs;
- pipelines: 1-, 2- and 4-stage pipelines of stage processes on the one device, with
             `transport: grpc` and `transport: shm` (CUDA IPC between CUDA stages; in the dry run
             the same protocol over CPU shared memory, HANDOFF_CPU): the step
             latency of one request (exact, and async mode beside it with 2+ stages)
             and images/s at 16 clients; each row records the data path every hop's
             stream took (`paths`, from the stages' `data_path` log lines) and fails
             unless it is the one its transport must take (`expected_path`);
- diffusers: diffusers' DiTPipeline on the same device at the same settings.

The summary (summary.json) lists every part with "ok", "failed" or "timeout"; the command
exits 1 unless every part is ok. MFU counts a multiply-add as 2 FLOPs (forward.forward_flops)
against the device's dense bf16 peak (PEAK_BF16_TFLOPS).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PARTS = ("parity", "forward", "pipelines", "diffusers")

PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 tensor-core peaks (NVIDIA datasheets, no sparsity), by a substring of
torch.cuda.get_device_name: the first match wins, so the specific names come first."""

LOGS_FILE = "pipelines-logs.txt"
"""Every pipeline variant's config and stage log tails, in one file."""

MAX_FILES = 8
"""The most files the device tool brings back from its output folder: the check writes
fewer (one JSON per part, the summary, the logs file), and `check` refuses more."""

PARITY_BOUND = 0.05
"""bf16 vs fp32 forward, scaled error max|a-b|/max|b|: bf16 rounds weights and activations
(u = 2^-9) at every layer; through 28 blocks that stays at a few 1e-3 to 1e-2 of the
output's scale. A wrong kernel or dtype path is far above it."""

GRAPH_BOUND = 0.02
"""Graph vs eager on the device: the same kernels except for the padded batch's blocking."""

HANDOFF_CPU = ("--handoff", "cpu-shared")
"""The CPU stages' handoff in the dry run: the cuda_ipc protocol (probe, handles in
frames, import and copy, acknowledgement, the sender's ledger, outputs kept on the
device) with torch's CPU shared memory in place of CUDA IPC (wire/cuda_ipc.CPU_SHARED)."""

TRANSPORT_BOUND = 0.01
"""One request's final latents through the same number of stages, transport by transport
(scaled error against the first transport's): the same kernels on the same rows, so equal
up to nondeterminism; a hop that read stale, unsynchronised or foreign memory is far off."""


@dataclass
class Settings:
    """What one run of the GPU check measures."""

    device: str = "cuda"
    """cuda (the check) or cpu (the dry run)."""
    model: str = "DiT-XL/2"
    """DiT config by name (random weights)."""
    latent_size: int = 32
    """Latent side: 32 is 256 px."""
    batches: tuple[int, ...] = (1, 8, 32, 64)
    """Rows per forward in the forward part."""
    repeats: int = 20
    """Timed forwards per batch size and mode (after warm-ups)."""
    stage_counts: tuple[int, ...] = (1, 2, 4)
    """Pipelines of stage processes, all on the one device."""
    transports: tuple[str, ...] = ("grpc", "shm")
    """Values of the pipeline config's `transport` field to compare."""
    clients: int = 16
    """Concurrent clients (one image with guidance each: 2 rows) for images/s."""
    steps: int = 20
    """ddim steps per request."""
    async_warmup_steps: int = 5
    """Async mode's exact warm-up steps W (the coordinator's default), for the one-request
    async latency of the 2- and 4-stage pipelines."""
    budgets: dict[str, float] = field(default_factory=lambda: {
        "parity": 45.0, "forward": 90.0, "pipelines": 235.0, "diffusers": 75.0})
    """Seconds each part may take (the whole ≤ 8 min with the install)."""

    @classmethod
    def quick(cls, device: str = "cpu") -> Settings:
        return cls(device=device, model="DiT-Tiny/2", latent_size=8, batches=(1, 4), repeats=2,
                   stage_counts=(1, 2), clients=2, steps=3,
                   async_warmup_steps=1,
                   # Limits, not targets: ~30 s in all on 2 idle cores, but a shared machine
                   # at load 20 took 105 s, and `make test` must not fail for that.
                   budgets={"parity": 120.0, "forward": 120.0, "pipelines": 240.0,
                            "diffusers": 120.0})


# ---- helpers ---------------------------------------------------------------------------

def scaled_error(actual, expected) -> float:
    """max|actual - expected| / max|expected| in float64 (tests/numerics.py's measure)."""
    a, b = actual.double().cpu(), expected.double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its name; None when unknown (no MFU then)."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def transport_available() -> bool:
    """Whether this tree's PipelineConfig has the `transport` field (issue #13's transport
    work adds it; until then every pipeline is gRPC bytes)."""
    from ditserve.config import PipelineConfig

    return "transport" in {f.name for f in dataclasses.fields(PipelineConfig)}


def device_info(device: str) -> dict[str, Any]:
    import torch

    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
        info |= {"name": name, "peak_bf16_tflops": peak_tflops(name)}
    return info


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], object], device: str, repeats: int) -> list[float]:
    """Wall milliseconds of `repeats` calls, the device drained around each."""
    times = []
    for _ in range(repeats):
        sync(device)
        began = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - began))
    return times


def inputs(config, rows: int, device: str = "cpu"):
    """A random microbatch (x, t, y) of `rows` rows."""
    import torch

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    y = torch.randint(0, config.num_classes, (rows,), generator=g)
    return x.to(device), t.to(device), y.to(device)


# ---- parts -----------------------------------------------------------------------------

def part_parity(s: Settings) -> dict[str, Any]:
    import torch

    from .weights import random_model

    model = random_model(s.model, s.latent_size)
    x, t, y = inputs(model.config, 2)
    with torch.inference_mode():
        expected = model(x, t, y)  # float32 on the CPU, (2, C_out, L, L)
        device_model = model.to(s.device, torch.bfloat16)  # bf16 on the CPU too, in the dry run
        actual = device_model(x.to(s.device), t.to(s.device), y.to(s.device)).float()
    error = scaled_error(actual, expected)
    return {"ok": error <= PARITY_BOUND, "scaled_error": error, "bound": PARITY_BOUND,
            "compare": f"{s.device}/bf16 vs cpu/float32", "rows": 2, "model": s.model}


def part_forward(s: Settings) -> dict[str, Any]:
    import torch

    from ditserve.stage import StageRunner
    from ditserve.stage.runner import compute_dtype

    from .forward import forward_flops
    from .weights import random_model

    model = random_model(s.model, s.latent_size).to(s.device, compute_dtype(s.device))
    depth = model.config.depth
    runner = StageRunner(model, (0, depth), max_batch_size=max(s.batches), wire_dtype="bf16")
    peak = peak_tflops(torch.cuda.get_device_name(0)) if s.device.startswith("cuda") else None
    flops = forward_flops(model.config)
    rows, ok = [], True
    with torch.inference_mode():
        for batch in s.batches:
            args = inputs(model.config, batch, s.device)
            args = (args[0].to(compute_dtype(s.device)), args[1].float(), args[2])
            modes = {"eager": runner._forward}
            if runner.graphs is not None:
                modes["graphs"] = runner.graphs
            outputs = {}
            for mode, fn in modes.items():
                outputs[mode] = fn(*args)[0]  # warm-up (and the capture, for graphs)
                times = timed_ms(lambda fn=fn, args=args: fn(*args), s.device, s.repeats)
                ms = statistics.median(times)
                rows.append({"batch": batch, "mode": mode, "forward_ms_median": ms,
                             "forward_ms_min": min(times), "tflops": flops * batch / ms / 1e9,
                             "mfu": (flops * batch / ms / 1e9 / peak) if peak else None})
            if "graphs" in outputs:
                error = scaled_error(outputs["graphs"], outputs["eager"])
                rows[-1]["graph_vs_eager"] = error
                ok &= error <= GRAPH_BOUND
    notes = [f"{s.model}, {s.latent_size * 8} px, {compute_dtype(s.device)}, whole model as "
             f"one stage's forward (device tensors in, device tensors out), median of {s.repeats}.",
             f"FLOPs per row {flops / 1e9:.1f} G (2 × multiply-adds); peak "
             f"{peak or 'unknown'} TFLOP/s dense bf16."]
    if runner.graphs is None:
        notes.append(f"CUDA graphs: not on {s.device} (eager only).")
    runner.close()
    return {"ok": ok, "rows": rows, "notes": notes, "flops_per_row": flops}


def part_pipelines(s: Settings, out: Path) -> dict[str, Any]:
    from .weights import checkpoint, random_model

    available = transport_available()
    result: dict[str, Any] = {"ok": True, "transport_field": available, "variants": []}
    if not available:
        result["transport"] = "not available"
    model = random_model(s.model, s.latent_size)
    with tempfile.TemporaryDirectory(prefix="ditserve-gpucheck-") as folder:
        path = checkpoint(model, folder)
        logs = Path(folder)
        for stages in s.stage_counts:
            reference: tuple[str, Any] | None = None  # the first transport's latents
            for transport in s.transports:
                row: dict[str, Any] = {"stages": stages, "transport": transport}
                if not available:
                    row |= {"status": "not available"} if transport != "grpc" else {
                        "status": "ok", "note": "no transport field: gRPC bytes"}
                if row.get("status") != "not available":
                    try:
                        row |= asyncio.run(_pipeline(s, model.config, path, stages,
                                                     transport if available else None,
                                                     logs))
                        latents = row.pop("latents")
                        if reference is None:
                            reference = (transport, latents)
                        else:  # a speed of wrong numbers is no result: compare first
                            error = scaled_error(latents, reference[1])
                            row |= {"latents_vs": reference[0], "latents_error": error}
                            if not error <= TRANSPORT_BOUND:  # NaN fails too
                                raise RuntimeError(
                                    f"one request's latents differ from {reference[0]}'s by "
                                    f"{error:.3g} (scaled; bound {TRANSPORT_BOUND}): the "
                                    f"{transport} hops did not carry the same activations")
                        row["status"] = "ok"
                    except Exception as error:
                        row |= {"status": "failed", "error": f"{type(error).__name__}: {error}"}
                        result["ok"] = False
                        result.setdefault("error", f"{stages} stages, {transport}: {row['error']}")
                result["variants"].append(row)
                _write(out / "pipelines.json", result)  # what ran so far survives a timeout
                name = f"{stages}-stages-{transport if available else 'default'}"
                _append_logs(out / LOGS_FILE, logs, name)
    return result


def _append_logs(path: Path, folder: Path, name: str, lines: int = 200) -> None:
    """The variant's config and its stages' last `lines` log lines, appended to ONE file
    (the device tool brings back at most MAX_FILES files)."""
    with path.open("a") as out:
        for file in sorted(folder.glob(f"{name}*")):
            if file.suffix in (".yaml", ".log"):
                tail = file.read_text(errors="replace").splitlines()[-lines:]
                out.write(f"==== {file.name}\n" + "\n".join(tail) + "\n")


async def _pipeline(s: Settings, config, path: Path, stages: int, transport: str | None,
                    folder: Path) -> dict[str, Any]:
    from ditserve.chain.remote import RemoteChain
    from ditserve.common.process import stop_all, wait_serving

    processes = _stage_processes(s, path, stages, transport, folder)
    try:
        for process in processes:
            process.start()
        wait_serving(processes, 180.0)
        chain = RemoteChain(processes[0].address)
        try:
            await chain.wait_connected(60.0)
            for clients in (1, s.clients):  # warm-up: the graphs of these row counts captured
                await _requests(chain, config, s, stages, clients, 2)
            kept: dict[int, Any] = {}
            one = await _requests(chain, config, s, stages, 1, s.steps, keep=kept)
            if kept.get(0) is None:
                raise RuntimeError("the one request finished without its latents")
            many = await _requests(chain, config, s, stages, s.clients, s.steps)
            # Async mode (one request, every stage on it at once): only worth measuring
            # with more than one stage.
            one_async = (await _requests(chain, config, s, stages, 1, s.steps, "async")
                         if stages > 1 else None)
        finally:
            await chain.close()
        paths = {p.name: stream_path(p.log()) for p in processes[:-1]}  # each hop's sender
        expected = expected_path(transport, s.device)
        if expected is not None and any(path != expected for path in paths.values()):
            raise RuntimeError(f"the hops used {paths}, transport {transport} on "
                               f"{s.device} should use {expected}")
    except Exception as error:  # a stage that failed mid-run: its own words, not only gRPC's
        tails = {p.name: p.log_tail(20) for p in processes if p.proc is not None}
        raise RuntimeError(f"{type(error).__name__}: {error}; stage logs: {tails}") from error
    finally:
        stop_all(processes)
        for process in processes:
            process.close()
    row = {"step_ms_one_request": 1e3 * one / s.steps, "images_per_s": s.clients / many,
           "clients": s.clients, "steps": s.steps, "paths": paths, "expected_path": expected,
           "latents": kept[0]}
    if one_async is not None:
        row |= {"step_ms_one_request_async": 1e3 * one_async / s.steps,
                "async_over_exact": one_async / one}
    return row


def stream_path(log: str) -> str | None:
    """The data path of a stage's stream to its next hop, from its log: the last
    `event=data_path` line ("cuda_ipc", "shm" or "grpc"; None when it logged none)."""
    paths = re.findall(r"event=data_path \S+ path=(\S+)", log)
    return paths[-1] if paths else None


def expected_path(transport: str | None, device: str) -> str | None:
    """The path every hop of a variant must take: `transport: shm` is the cuda_ipc path,
    by CUDA IPC handles between CUDA stages (what a GPU run proves) and, in the CPU dry
    run, by the same protocol over torch's CPU shared memory (HANDOFF_CPU), so that the
    dry run exercises the handoff code the GPU run depends on."""
    if transport is None:
        return None  # a tree without the transport field: whatever it does
    if transport == "grpc":
        return "grpc"
    return "cuda_ipc"


def _stage_processes(s: Settings, path: Path, stages: int, transport: str | None,
                     folder: Path) -> list:
    """`ditserve stage --config` processes of a pipeline config written for this variant."""
    import yaml

    from ditserve.common.process import ServiceProcess, ditserve_argv, free_port, thread_env
    from ditserve.config import config_from_dict

    ports = [free_port() for _ in range(stages)]
    rows = 2 * s.clients
    data: dict[str, Any] = {
        "model": {"checkpoint": str(path), "name": s.model},
        "stages": [{"address": f"127.0.0.1:{p}", "listen": f"127.0.0.1:{p}", "device": s.device}
                   for p in ports],
        "wire_dtype": "bf16", "max_batch_size": max(rows, 2),
        "coordinator": {"max_rows_per_microbatch": max(rows, 2)}}
    if transport is not None:
        data["transport"] = transport
    config_from_dict(data)  # refuses a bad config here, not in every stage's log
    name = f"{stages}-stages-{transport or 'default'}"
    config_path = folder / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    cuda = s.device.startswith("cuda")
    threads = 2 if cuda else 1
    handoff = () if cuda else HANDOFF_CPU
    return [ServiceProcess(f"stage-{k}", ditserve_argv("stage", "--config", str(config_path),
                                                      "--stage", str(k), "--threads", str(threads),
                                                      *handoff),
                           f"127.0.0.1:{p}", folder / f"{name}-stage-{k}.log", thread_env(threads))
            for k, p in enumerate(ports)]


async def _requests(chain, config, s: Settings, stages: int, clients: int, steps: int,
                    mode: str = "exact", keep: dict[int, Any] | None = None) -> float:
    """Wall seconds for `clients` concurrent requests (1 image, guidance 4, ddim `steps`,
    in `mode`); with `keep`, each request's final latents (CPU float32) land in it by
    index (request i has seed i, so runs are comparable)."""
    from ditserve.config import CoordinatorConfig
    from ditserve.coordinator.engine import Engine
    from ditserve.coordinator.request import Result
    from ditserve.coordinator.spec import GenerationSpec

    engine_config = CoordinatorConfig(
        max_rows_per_microbatch=max(2, 2 * clients), max_queued_requests=256,
        microbatches_in_flight=stages)
    engine = Engine(chain, config, engine_config, stages)

    async def one(i: int) -> None:
        spec = GenerationSpec(request_id=f"r{i}", labels=(i % config.num_classes,), seed=i,
                              sampler="ddim", num_steps=steps, guidance_scale=4.0,
                              skip_images=True, mode=mode, async_warmup_steps=(
                                  min(s.async_warmup_steps, steps) if mode == "async" else 0),
                              return_latents=keep is not None)
        async for event in engine.submit(spec).events():
            if keep is not None and isinstance(event, Result):
                keep[i] = event.latents

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - began
    await engine.close()
    return wall


def part_diffusers(s: Settings) -> dict[str, Any]:
    import torch

    from ditserve.stage.runner import compute_dtype

    from .peer import pipeline, small_vae
    from .weights import random_model

    dtype = compute_dtype(s.device)
    model = random_model(s.model, s.latent_size)
    pipe = pipeline(model, small_vae(s.device), s.device).to(s.device, dtype)

    def run(clients: int, steps: int) -> float:
        began = time.perf_counter()
        pipe([i % model.config.num_classes for i in range(clients)], guidance_scale=4.0,
             num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
             output_type="pt")
        sync(s.device)
        return time.perf_counter() - began

    run(s.clients, 2)  # warm-up
    one, many = run(1, s.steps), run(s.clients, s.steps)
    return {"ok": True, "step_ms_one_request": 1e3 * one / s.steps,
            "images_per_s": s.clients / many, "clients": s.clients, "steps": s.steps,
            "notes": ["DiTPipeline (ddim, guidance 4, the clients' labels in one batched call), "
                      f"transformer in {dtype} with ditserve's random weights; its times include "
                      "a small random VAE's decode, ditserve's pipelines decode nothing."]}


# ---- the driver ------------------------------------------------------------------------

def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def run_part(name: str, s: Settings, out: Path) -> None:
    """In this process: one part, its JSON written to out/NAME.json."""
    began = time.perf_counter()
    try:
        if name == "pipelines":
            result = part_pipelines(s, out)
        else:
            result = {"parity": part_parity, "forward": part_forward,
                      "diffusers": part_diffusers}[name](s)
    except Exception as error:
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    result |= {"part": name, "seconds": time.perf_counter() - began,
               "device": device_info(s.device), "settings": asdict(s)}
    _write(out / f"{name}.json", result)


def run_all(s: Settings, out: Path, quick: bool) -> dict[str, Any]:
    """Every part in its own process, each within its budget; writes summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (*(f"{p}.json" for p in PARTS), "summary.json", LOGS_FILE):
        (out / name).unlink(missing_ok=True)  # a previous run's: appended to, or judged
    summary: dict[str, Any] = {"device": s.device, "quick": quick, "parts": {}}
    for name in PARTS:
        summary["parts"][name] = _run_child(name, s, out, quick)
    summary["transport"] = ("available" if transport_available() else "not available")
    summary["ok"] = all(p["status"] == "ok" for p in summary["parts"].values())
    _write(out / "summary.json", summary)
    return summary


def _run_child(name: str, s: Settings, out: Path, quick: bool) -> dict[str, Any]:
    budget = s.budgets[name]
    argv = [sys.executable, "-m", "ditserve.bench.gpucheck", "--part", name,
            "--device", s.device, "--out", str(out), *(["--quick"] if quick else [])]
    began = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        log, _ = child.communicate(timeout=budget)
        status = None
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)  # the part stops its stage processes
        try:
            log, _ = child.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            log, _ = child.communicate()
        status = "timeout"
    path = out / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if status is None:
        status = "ok" if result.get("ok") else "failed"
    entry = {"status": status, "seconds": round(time.perf_counter() - began, 1), "budget": budget}
    if status != "ok":
        entry["error"] = result.get("error") or f"exit {child.returncode}: {log[-2000:]}"
        if not path.exists() or status == "timeout":
            _write(path, {**result, "ok": False, "part": name, **entry})
    return entry


def check(summary_path: Path) -> list[str]:
    """What is wrong with a summary: a part missing or not ok (empty: all good)."""
    if not summary_path.exists():
        return [f"{summary_path} is missing"]
    summary = json.loads(summary_path.read_text())
    parts = summary.get("parts", {})
    problems = [f"part {p}: missing" for p in PARTS if p not in parts]
    problems += [f"part {p}: {v.get('status')}: {v.get('error', '')}"[:500]
                 for p, v in parts.items() if v.get("status") != "ok"]
    problems += [f"part {p}: no {p}.json" for p in PARTS
                 if not (summary_path.parent / f"{p}.json").exists()]
    files = [f for f in summary_path.parent.rglob("*") if f.is_file()]
    if len(files) > MAX_FILES or any(f.parent != summary_path.parent for f in files):
        problems.append(f"{len(files)} files under {summary_path.parent}: the device tool "
                        f"brings back at most {MAX_FILES}, all in that folder")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditserve.bench.gpucheck",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (dry run)")
    parser.add_argument("--out", default="gpu-check", help="folder for the JSON files")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # the child's role
    args = parser.parse_args(argv)
    s = Settings.quick(args.device) if args.quick else Settings(device=args.device)
    out = Path(args.out)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device here; --device cpu --quick is the dry run",
                  file=sys.stderr)
            return 2
    if args.part:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups
        run_part(args.part, s, out)
        return 0
    summary = run_all(s, out, args.quick)
    for name, part in summary["parts"].items():
        print(f"{name:10s} {part['status']:8s} {part['seconds']:6.1f} s"
              + (f"  {part['error'][:300]}" if "error" in part else ""))
    problems = check(out / "summary.json")
    print("gpu-check: " + ("every part ok" if not problems else "; ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
