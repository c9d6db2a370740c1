"""`ditserve bench SCENARIO`: reproducible benchmarks of the pipeline (issue 8).

One module per scenario (distribution, throughput, load, peer, wire, transport, memory, gpu,
forward, gateway, tls, soak, bursts, latency), each with a `Settings` dataclass (full and
`--quick` sizes) and `run(settings) -> Report`. Shared pieces: report.py (statistics, JSON + Markdown, machine
description), procs.py (stage processes on loopback, through common/process.py),
weights.py (random weights at the real sizes).

Every comparison is measured side by side in one run, alternating the variants, and
reported as a median with its spread: the machines this runs on are shared and noisy.
"""
