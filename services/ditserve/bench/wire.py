"""The wire: bytes per step on the stage hops, and the codec's speed.

1. Measured bytes: a chain of S stage processes serves K steps of N rows; each stage's
   `dit_wire_bytes_total{direction="tx"}` counter (payload bytes it sent to the next stage)
   is read from its metrics endpoint, and compared with the theoretical (S−1)·T·D·2 bytes
   per row (bf16 tokens h; the conditioning c adds (S−1)·D·2). An image with guidance is 2
   rows.
2. Codec: one activation (N, T, D) bf16 through the real send path (`lean_frames` into
   ~1 MiB ForwardRequest frames, serialised with one join, wire/lean.py) and receive path
   (lean parse, `FrameAssembler` into one buffer, tensor view), against a plain tensor
   copy of the same bytes; variants alternated.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass

import torch
from ditserve_client.proto.dit.v1 import stage_pb2

from ditserve.wire import FrameAssembler, lean_frames, parse_request, serialize

from .chains import forward, guided_labels, open_variants
from .procs import metric
from .report import Report, spread
from .weights import checkpoint, random_model


@dataclass
class Settings:
    """What `ditserve bench wire` measures."""

    model: str = "DiT-S/2"
    """DiT config whose chain is measured (T and D follow from it)."""
    latent_size: int = 32
    """Latent side: 32 is 256 px (T = 256 tokens at patch 2)."""
    stage_counts: tuple[int, ...] = (2, 4)
    """Chains measured."""
    rows: int = 4
    """Rows per step."""
    steps: int = 5
    """Steps sent through each chain."""
    codec_shape: tuple[int, ...] = (8, 256, 1152)
    """(N, T, D) of the codec's activation: 4 guided DiT-XL/2 images at 256 px."""
    codec_repeats: int = 15
    """Alternations of encode, decode and copy."""
    threads: int = 0
    """torch threads; 0: all cores."""
    device: str = "cpu"
    """cpu (the codec always runs on the CPU)."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(model="DiT-Tiny/2", latent_size=8, stage_counts=(2,), steps=2,
                   codec_shape=(2, 16, 64), codec_repeats=3, threads=1)


async def _hop_bytes(s: Settings) -> tuple[list[dict], dict]:
    model = random_model(s.model, s.latent_size)
    cfg = model.config
    x = torch.randn(s.rows, cfg.in_channels, s.latent_size, s.latent_size)
    t, y = torch.full((s.rows,), 500), guided_labels(s.rows, cfg.num_classes)
    rows, samples = [], {}
    with tempfile.TemporaryDirectory(prefix="ditserve-bench-") as folder:
        path = checkpoint(model, folder)
        async with AsyncExitStack() as stack:
            variants = await open_variants(stack, model, path, s.stage_counts,
                                           dict.fromkeys(s.stage_counts, 1), s.device)
            for variant in variants[1:]:
                for _ in range(s.steps):
                    await forward(variant, x, t, y)
                sent = [metric(m, "dit_wire_bytes_total", direction="tx", peer=f"stage-{k + 1}")
                        for k, m in enumerate(variant.processes.scrape())]
                samples[variant.name] = sent
                rows.append(_bytes_row(variant.stages, sent, cfg, s))
    return rows, samples


def _bytes_row(stages: int, sent: list[float], cfg, s: Settings) -> dict:
    """Stage-to-stage bytes: what each stage sent to the next (peer stage-k+1); replies
    travelling back (the small model output) are counted apart, as peer "upstream"."""
    hops = sum(sent)
    per_row = hops / (s.steps * s.rows)
    theory = (stages - 1) * cfg.num_tokens * cfg.hidden_size * 2
    return {"what": f"{stages} stages, {s.model} (T={cfg.num_tokens}, D={cfg.hidden_size})",
            "measured": f"{per_row * 2 / 1024:.1f} KiB/image ({per_row / 1024:.1f} KiB/row)",
            "theory": f"{theory * 2 / 1024:.1f} KiB/image", "ratio": per_row / theory}


def _codec(s: Settings) -> tuple[list[dict], dict]:
    h = torch.randn(*s.codec_shape).to(torch.bfloat16)
    nbytes = h.numel() * h.element_size()
    wire = [serialize(f) for f in lean_frames(stage_pb2.ForwardRequest, 1, [("h", h)])]
    target = torch.empty_like(h)
    raw = memoryview(h.view(torch.uint8).numpy())
    ops = {"encode (frames + serialise)": lambda: [
               serialize(f) for f in lean_frames(stage_pb2.ForwardRequest, 1, [("h", h)])],
           "decode (parse + assemble)": lambda: _decode(wire),
           "plain tensor copy (torch copy_)": lambda: target.copy_(h),
           "plain memcpy (bytes of the tensor)": lambda: bytes(raw)}
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(s.codec_repeats):
        for name, op in ops.items():
            began = time.perf_counter()
            op()
            times[name].append(time.perf_counter() - began)
    copy = spread(times["plain memcpy (bytes of the tensor)"])["median"]
    rows = [{"what": f"{name}, {nbytes / 2**20:.1f} MiB", "measured":
             f"{nbytes / spread(v)['median'] / 1e9:.2f} GB/s [{nbytes / max(v) / 1e9:.2f}–"
             f"{nbytes / min(v) / 1e9:.2f}]", "theory": "–",
             "ratio": copy / spread(v)["median"]} for name, v in times.items()]
    return rows, times


def _decode(wire: list[bytes]) -> torch.Tensor:
    assembler = FrameAssembler(max_payload_bytes=1 << 40)
    for data in wire:
        done = assembler.add(parse_request(data))
    return done.tensors["h"]


def run(s: Settings) -> Report:
    s.threads = s.threads or os.cpu_count() or 1
    torch.set_num_threads(s.threads)
    hop_rows, hop_samples = asyncio.run(_hop_bytes(s))
    codec_rows, codec_samples = _codec(s)
    notes = ["Bytes: stage-to-stage payload bytes (dit_wire_bytes_total, tx to the next stage)"
             f" over {s.steps} steps of {s.rows} rows; theory = (S−1)·T·D·2 bytes per row "
             "(bf16 h), ×2 rows per guided image; ratio = measured / theory (the excess is c, "
             "(S−1)·D·2 per row).",
             f"Codec: activation {list(s.codec_shape)} bf16, {s.codec_repeats} alternations; "
             "ratio = memcpy time / this time (1 = as fast as one plain copy of the bytes; "
             "encode and decode each make one copy by design, wire/codec.py)."]
    columns = [("what", "what"), ("measured", "measured"), ("theory", "theory"),
               ("ratio", "ratio")]
    return Report("wire", hop_rows + codec_rows, columns,
                  {"hop_tx_bytes_per_stage": hop_samples, "codec_seconds": codec_samples},
                  notes, asdict(s))
