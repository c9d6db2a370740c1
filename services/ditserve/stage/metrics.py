"""A stage worker's Prometheus metrics (dit_ prefix, base units)."""

from __future__ import annotations

import functools

from prometheus_client import Gauge

from ditserve.common.metrics import MICROBATCHES, WIRE_BYTES, latency_histogram

COMPUTE_SECONDS = latency_histogram("dit_stage_compute_seconds",
                                    "Seconds of compute per microbatch on this stage.")
MICROBATCH_SECONDS = latency_histogram(
    "dit_stage_microbatch_seconds",
    "Seconds from a microbatch's last byte in to its reply out, including later stages.")
IN_FLIGHT = Gauge("dit_stage_microbatches_in_flight",
                  "Microbatches received and not yet answered by this stage.")

# Labelled children cached: `labels(...)` per microbatch (a lock and a dict per call) was
# a measurable part of a hop's ~0.3 ms of Python.
wire_bytes = functools.cache(WIRE_BYTES.labels)
"""WIRE_BYTES's child for (direction, peer)."""
microbatches = functools.cache(MICROBATCHES.labels)
"""MICROBATCHES's child for (stage, outcome)."""
