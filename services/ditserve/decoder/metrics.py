"""The decoder's Prometheus metrics (`dit_decoder_*`, base units)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ditserve.common.metrics import latency_histogram

DECODE_SECONDS = latency_histogram(
    "dit_decoder_decode_seconds", "Seconds of one request's decode, queueing excluded.")
REQUEST_SECONDS = latency_histogram(
    "dit_decoder_request_seconds", "Seconds of a Decode call, from arrival to encoded images.")
BATCH_ROWS = Histogram("dit_decoder_batch_rows", "Latent rows per VAE call.",
                       buckets=(1, 2, 4, 8, 16, 32, 64))
REQUESTS = Counter("dit_decoder_requests", "Decode calls by outcome (ok or the status code).",
                   ["outcome"])
QUEUE_ROWS = Gauge("dit_decoder_queue_rows", "Latent rows waiting for the VAE.")
IMAGE_BYTES = Counter("dit_decoder_image_bytes", "Encoded image bytes returned, by format.",
                      ["format"])
