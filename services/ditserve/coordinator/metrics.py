"""The coordinator's Prometheus metrics (`dit_` prefix, base units), registered once per
process in the default registry and exposed by the lifecycle's /metrics endpoint.

Stage utilisation = rate(dit_stage_busy_seconds_total[1m]) per stage: the stages' own
compute seconds, reported with each microbatch's reply and summed here.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ditserve.common.metrics import latency_histogram

STEP_SECONDS = latency_histogram(
    "dit_coordinator_step_seconds",
    "Wall time of one denoising step of one request: from its microbatch's launch to the "
    "sampler update.")
MICROBATCH_SECONDS = latency_histogram(
    "dit_coordinator_microbatch_seconds",
    "Wall time of one microbatch through the whole stage chain, retries included.")
QUEUE_DEPTH = Gauge("dit_coordinator_queue_depth",
                    "Requests admitted and waiting to start denoising.")
ACTIVE_REQUESTS = Gauge("dit_coordinator_active_requests", "Requests being denoised.")
MICROBATCHES_IN_FLIGHT = Gauge("dit_coordinator_microbatches_in_flight",
                               "Microbatches sent along the chain and not yet answered.")
ROWS_PER_MICROBATCH = Histogram("dit_coordinator_microbatch_rows",
                                "Rows (images, twice with guidance) per microbatch.",
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128))
REQUESTS = Counter("dit_coordinator_requests",
                   "Requests finished, by outcome (ok or the canonical status code name).",
                   ["outcome"])
RETRIES = Counter("dit_coordinator_microbatch_retries",
                  "Microbatches resent after a retryable (UNAVAILABLE) failure.")
STAGE_BUSY_SECONDS = Counter("dit_stage_busy_seconds",
                             "Seconds each stage spent computing this coordinator's "
                             "microbatches, as the stages report them.", ["stage"])
PEER_UP = Gauge("dit_coordinator_peer_up",
                "1 while the peer (stage chain, decoder) answers, 0 while the coordinator "
                "waits for it to come back.", ["peer"])
STAGE_SERVING = Gauge("dit_coordinator_stage_serving",
                      "1 if the stage answered the last chain description healthy, 0 if it "
                      "was unreachable or not serving (described every "
                      "coordinator.stage_health_interval_seconds, and by GetModelInfo).",
                      ["stage"])
