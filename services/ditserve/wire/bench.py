"""Measures the wire: codec GB/s next to a plain tensor copy, and a real stage hop's
overhead on loopback. Not a test; run it and read the numbers:

    python -m ditserve.wire.bench [--repeats 20]

- codec: encode = `encode_frames` (one copy into ~1 MiB frames); decode = FrameAssembler
  (one copy into the preallocated buffer, then zero-copy views); copy = `tensor.clone()`.
- hop: a `ditserve stage` subprocess serving the last stage (1 block + final layer) of a
  DiT-XL-width model (T=256, D=1152); the client sends h (N, 256, 1152) bf16 and c, and
  overhead = round trip - the compute seconds the stage reports in its reply. So it counts
  encode, transfer, reassembly, validation and the small FP32 reply, not the block.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MIB = 1 << 20


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def codec_throughput(nbytes: int, repeats: int) -> dict[str, float]:
    """GB/s of encode, decode and a plain clone for a bf16 tensor of `nbytes`."""
    from ditserve_client.proto.dit.v1 import stage_pb2

    from ditserve.wire import FrameAssembler, encode_frames

    h = torch.randn(nbytes // 2).bfloat16()
    frames = encode_frames(stage_pb2.ForwardRequest, 1, [("h", h)])

    def decode():
        assembler = FrameAssembler()
        for frame in frames:
            assembler.add(frame)
    seconds = {"encode": _best(lambda: encode_frames(stage_pb2.ForwardRequest, 1, [("h", h)]),
                               repeats),
               "decode": _best(decode, repeats), "clone": _best(h.clone, repeats)}
    return {name: nbytes / s / 1e9 for name, s in seconds.items()}


def _write_model(folder: Path) -> Path:
    from ditserve.model import DiT, dit_config, save_ditserve

    config = dit_config("DiT-XL/2", depth=2, mlp_ratio=0.25)  # narrow MLP: less compute
    model = DiT(config)
    path = folder / "xl-width.safetensors"
    save_ditserve(model.state_dict().items(), config, path)
    return path


def _start_stage(checkpoint: Path, port: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "ditserve.cli", "stage", "--checkpoint", str(checkpoint),
            "--stage", "1", "--stages", "2", "--listen", f"127.0.0.1:{port}",
            "--wire-dtype", "bf16", "--threads", "1"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def hop_overhead(address: str, rows: int, repeats: int) -> tuple[float, float]:
    """Median (overhead ms, compute ms) of one hop carrying h (rows, 256, 1152) bf16."""
    from ditserve.chain.remote import StageClient

    client = StageClient(address, peer="bench")
    await client.wait_connected(60)
    h = torch.randn(rows, 256, 1152).bfloat16()
    c = torch.randn(rows, 1152).bfloat16()
    overheads, computes = [], []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            _, seconds = await client.call([("h", h), ("c", c)])
            wall = time.perf_counter() - start
            overheads.append((wall - seconds[0]) * 1e3)
            computes.append(seconds[0] * 1e3)
    finally:
        await client.close()
    return statistics.median(overheads), statistics.median(computes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for label, nbytes in (("576 KiB", 576 * 1024), ("4.6 MiB", 8 * 576 * 1024)):
        rates = codec_throughput(nbytes, args.repeats)
        print(f"codec {label}: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in rates.items()))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = _write_model(Path(folder))
        port = 50000 + int(time.time()) % 10000
        stage = _start_stage(checkpoint, port)
        try:
            for label, rows in (("576 KiB", 1), ("4.6 MiB", 8)):
                overhead, compute = asyncio.run(hop_overhead(f"127.0.0.1:{port}", rows,
                                                             max(3, args.repeats // 4)))
                print(f"hop {label} bf16 h: overhead {overhead:.2f} ms "
                      f"(block compute {compute:.1f} ms, excluded)")
        finally:
            stage.kill()
            stage.wait()


if __name__ == "__main__":
    main()
