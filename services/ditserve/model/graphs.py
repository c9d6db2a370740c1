"""CUDA graphs of a forward, one per batch size, with rows padded up to the next size.

A GPU stage's forward is a few hundred small kernels (DiT-XL/2: ~20 per block); at the
batch sizes a pipeline runs (1 to 32 rows, ~0.1 ms per row for a quarter of the model on
an H100) launching them from Python costs about as much as running them. A CUDA graph
replays the whole forward with one launch. A graph is fixed to its input shapes, so:

- the batch sizes are a short ladder (1, 2, 4, 8, then every 8 up to the most rows a stage
  accepts), and a microbatch's rows are padded with zeros up to the next rung: rows of a
  DiT are independent (LayerNorm per token, attention within a row), so padding changes
  nothing in the real rows, and the waste is at most 8 rows past 8;
- each rung is captured lazily, the first time a microbatch needs it, into static input
  buffers (all graphs share one memory pool); rows beyond the top rung, and a rung whose
  capture failed, run eagerly.

vLLM pads decode batches to captured sizes the same way. Imports torch only.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

Forward = Callable[..., tuple[torch.Tensor, ...]]
"""A forward on device tensors whose dim 0 is the batch: inputs → outputs, each (N, ...)."""


def graph_batch_sizes(max_rows: int) -> tuple[int, ...]:
    """The ladder of captured batch sizes: 1, 2, 4, 8, 16, 24, ... and max_rows itself."""
    sizes = {n for n in (1, 2, 4) if n <= max_rows} | set(range(8, max_rows + 1, 8))
    return tuple(sorted(sizes | {max_rows}))


def padded_size(rows: int, sizes: Sequence[int]) -> int | None:
    """The smallest size in `sizes` (ascending) holding `rows`; None when none does."""
    i = bisect.bisect_left(sizes, rows)
    return sizes[i] if i < len(sizes) else None


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` (N, ...) with zero rows appended up to (rows, ...)."""
    if tensor.shape[0] == rows:
        return tensor
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad])


class _Graph:
    """One captured forward: static inputs, the graph, its static outputs."""

    def __init__(self, forward: Forward, inputs: Sequence[torch.Tensor], pool: object):
        self.inputs = [x.clone() for x in inputs]
        # Warm up on a side stream first (cuBLAS/cuDNN pick their kernels and allocate
        # workspaces there, which must not happen during capture), as torch documents.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: only this (the compute) thread must avoid unsafe CUDA calls while
        # capturing; the default ("global") would also fail another thread's pinned-memory
        # or CUDA IPC call made meanwhile, or be invalidated by it.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = forward(*self.inputs)

    def replay(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for static, x in zip(self.inputs, inputs, strict=True):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.outputs


class CudaGraphs:
    """`forward` through CUDA graphs per padded batch size, eager where none applies.

    Call it like `forward`; the outputs are fresh tensors (a graph's own outputs are
    overwritten by its next replay, so they are cloned out). Not thread-safe: a stage
    calls it from its one compute thread only.
    """

    def __init__(self, forward: Forward, sizes: Sequence[int]):
        self.forward = forward
        self.sizes = tuple(sorted(sizes))
        self._graphs: dict[int, _Graph | None] = {}  # None: capture failed, run eagerly
        self._pool: object = None  # one memory pool for all the graphs, made at first capture

    @property
    def captured(self) -> tuple[int, ...]:
        """Batch sizes with a graph so far."""
        return tuple(sorted(n for n, g in self._graphs.items() if g is not None))

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = inputs[0].shape[0]
        size = padded_size(rows, self.sizes)
        graph = self._graph(size, inputs) if size is not None else None
        if graph is None:
            return self.forward(*inputs)
        outputs = graph.replay([pad_rows(x, size) for x in inputs])
        return tuple(out[:rows].clone() for out in outputs)

    def _graph(self, size: int, inputs: Sequence[torch.Tensor]) -> _Graph | None:
        if size not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                self._graphs[size] = _Graph(self.forward, [pad_rows(x, size) for x in inputs],
                                            self._pool)
            except RuntimeError as error:  # an op that cannot be captured: stay eager
                log.warning("CUDA graph capture for %d rows failed, running eagerly: %s",
                            size, error)
                self._graphs[size] = None
        return self._graphs[size]
