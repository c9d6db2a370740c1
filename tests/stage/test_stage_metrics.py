"""A stage's Prometheus endpoint counts what it did: microbatches, compute, wire bytes."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import torch
from conftest import find_free_port
from ditserve.chain.remote import RemoteChain


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^(dit_[^ ]+) ([0-9.e+-]+)$", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


async def _forward(address: str, n: int) -> torch.Tensor:
    chain = RemoteChain(address)
    try:
        x = torch.randn(n, 4, 8, 8)
        out, _ = await chain.forward(x, torch.full((n,), 10), torch.zeros(n, dtype=torch.long))
        return out
    finally:
        await chain.close()


def test_metrics_count_microbatches_compute_and_bytes(launcher, tiny_checkpoint):
    metrics_port = find_free_port()
    stage = launcher.start_stage(tiny_checkpoint, 0, 1, find_free_port(),
                                 extra=["--metrics-port", str(metrics_port)])
    before = _scrape(metrics_port)
    for n in (2, 3):
        asyncio.run(_forward(stage.address, n))
    after = _scrape(metrics_port)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("dit_stage_compute_seconds_count") == 2
    assert grew("dit_stage_compute_seconds_sum") > 0
    # received payload: x (n, 4, 8, 8) fp32 + t and y (n,) int64 for n = 2 and 3
    received = sum(n * (4 * 8 * 8 * 4 + 8 + 8) for n in (2, 3))
    rx = [k for k in after if k.startswith("dit_wire_bytes_total") and 'direction="rx"' in k]
    assert rx and sum(after[k] - before.get(k, 0.0) for k in rx) == received
    ok = [k for k in after if k.startswith("dit_microbatches_total") and 'outcome="ok"' in k]
    assert ok and sum(after[k] - before.get(k, 0.0) for k in ok) == 2
