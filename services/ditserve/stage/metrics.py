"""A stage worker's Prometheus metrics (dit_ prefix, base units)."""

from __future__ import annotations

from prometheus_client import Gauge

from ditserve.common.metrics import latency_histogram

COMPUTE_SECONDS = latency_histogram("dit_stage_compute_seconds",
                                    "Seconds of compute per microbatch on this stage.")
MICROBATCH_SECONDS = latency_histogram(
    "dit_stage_microbatch_seconds",
    "Seconds from a microbatch's last byte in to its reply out, including later stages.")
IN_FLIGHT = Gauge("dit_stage_microbatches_in_flight",
                  "Microbatches received and not yet answered by this stage.")
