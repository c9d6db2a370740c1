"""Prometheus metrics shared by the services: `dit_` prefix, base units (seconds, bytes).

Each service registers its own metrics in the process's default registry (one service per
process) and `serve_metrics(port)` exposes them at http://HOST:PORT/metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# From 1 ms to ~30 s: a tiny model's hop on loopback up to an XL/2 step on a CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)

WIRE_BYTES = Counter("dit_wire_bytes", "Tensor payload bytes on the stream, by direction "
                     "(rx = received, tx = sent) and peer role.", ["direction", "peer"])
DATA_PATH_STREAMS = Gauge("dit_data_path_streams", "Open streams to a peer, by the data path "
                          "they negotiated (cuda_ipc, shm or grpc).", ["peer", "path"])
MICROBATCHES_SENT = Counter("dit_microbatches_sent", "Microbatches sent to a peer, by the path "
                            "their payload took (cuda_ipc, shm or grpc): fewer by the stream's "
                            "path than sent means fallbacks.", ["peer", "path"])
HANDOFFS_HELD = Gauge("dit_handoffs_held", "Microbatches whose tensors a sender keeps alive "
                      "until the peer acknowledges its copy (CUDA IPC).", ["peer"])
MICROBATCHES = Counter("dit_microbatches", "Microbatches finished by a service, by outcome "
                       "(ok or the canonical status code name).", ["service", "outcome"])


def latency_histogram(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Histogram:
    """A seconds histogram with ditserve's buckets; `name` must start with dit_ and end
    with _seconds."""
    if not (name.startswith("dit_") and name.endswith("_seconds")):
        raise ValueError(f"metric {name!r}: use the dit_ prefix and the _seconds unit suffix")
    return Histogram(name, documentation, list(labels), buckets=LATENCY_BUCKETS)


def serve_metrics(port: int | None, host: str = "0.0.0.0") -> None:
    """Starts the /metrics HTTP endpoint on `port` (None or 0: no endpoint)."""
    if port:
        start_http_server(port, addr=host)
