"""model/graphs.py: the ladder of batch sizes, padding, and (on a GPU only) graph = eager.

Capture and replay need a CUDA device; on a CPU the selection logic is tested here and
the premise of padding (rows of a DiT are independent) in tests/stage/test_stage_runner.py.
Whether a replayed graph equals the eager forward is checked only where CUDA is present
(the last test here, and the `forward` part of scripts/gpu-check.sh).
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from ditserve.model.graphs import CudaGraphs, graph_batch_sizes, pad_rows, padded_size
from numerics import assert_scaled_close


@pytest.mark.parametrize(("max_rows", "sizes"), [
    (1, (1,)), (5, (1, 2, 4, 5)), (8, (1, 2, 4, 8)), (32, (1, 2, 4, 8, 16, 24, 32)),
    (36, (1, 2, 4, 8, 16, 24, 32, 36)), (64, (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64))])
def test_the_ladder_ends_at_the_most_rows(max_rows, sizes):
    assert graph_batch_sizes(max_rows) == sizes


@pytest.mark.parametrize(("rows", "size"), [(1, 1), (3, 4), (8, 8), (9, 16), (17, 24),
                                            (32, 32), (33, None)])
def test_rows_pad_up_to_the_next_rung_and_beyond_the_top_run_eagerly(rows, size):
    assert padded_size(rows, graph_batch_sizes(32)) == size


def test_padding_appends_zero_rows_only():
    x = torch.randn(3, 2, 5)
    padded = pad_rows(x, 8)
    assert padded.shape == (8, 2, 5) and torch.equal(padded[:3], x)
    assert not padded[3:].any()
    assert pad_rows(x, 3) is x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_replayed_graphs_equal_the_eager_forward_on_cuda(tiny_model):
    from ditserve.stage import StageRunner

    model = tiny_model.to("cuda", torch.bfloat16)
    runner = StageRunner(model, (0, model.config.depth), max_batch_size=8, wire_dtype="fp32")
    assert isinstance(runner.graphs, CudaGraphs)
    cfg = model.config
    for rows in (1, 3, 8):
        inputs = {"x": torch.randn(rows, cfg.in_channels, cfg.input_size, cfg.input_size),
                  "t": torch.randint(0, 1000, (rows,)), "y": torch.randint(0, 10, (rows,))}
        (_, graphed), = runner.compute(inputs)
        (_, again), = runner.compute(inputs)  # a replay, not the capture
        runner.graphs, graphs = None, runner.graphs
        (_, eager), = runner.compute(inputs)
        runner.graphs = graphs
        assert_scaled_close(graphed, eager, 1e-2, f"graph vs eager, {rows} rows")
        assert torch.equal(graphed, again)
    assert runner.graphs.captured == (1, 4, 8)
    runner.close()


class _EagerGraph:
    """Stands in for a captured graph on the CPU: static buffers, replay = the forward."""

    captures: ClassVar[list[int]] = []

    def __init__(self, forward, inputs, pool):
        if inputs[0].shape[0] == 16:
            raise RuntimeError("operation not permitted when stream is capturing")
        _EagerGraph.captures.append(inputs[0].shape[0])
        self.forward, self.inputs = forward, [x.clone() for x in inputs]
        self.outputs = forward(*self.inputs)

    def replay(self, inputs):
        for static, x in zip(self.inputs, inputs, strict=True):
            static.copy_(x)
        self.outputs[0].copy_(self.forward(*self.inputs)[0])
        return self.outputs


def test_dispatch_captures_each_rung_once_pads_slices_and_falls_back(monkeypatch):
    """The selection logic without a GPU: a stand-in graph that replays eagerly."""
    import ditserve.model.graphs as graphs

    monkeypatch.setattr(graphs, "_Graph", _EagerGraph)
    monkeypatch.setattr(graphs.torch.cuda, "graph_pool_handle", lambda: "pool")
    _EagerGraph.captures = []
    calls = []

    def forward(x):
        calls.append(x.shape[0])
        return (x * 2 + 1,)

    wrapped = CudaGraphs(forward, graph_batch_sizes(16))
    for rows in (3, 4, 3, 20, 9, 9):
        x = torch.randn(rows, 5)
        (out,) = wrapped(x)
        assert out.shape == (rows, 5) and torch.equal(out, x * 2 + 1)
    assert _EagerGraph.captures == [4]  # 3 and 4 rows share the rung of 4, captured once
    assert wrapped.captured == (4,)  # 20 rows: beyond the ladder; 9 → 16: capture failed
    assert calls.count(20) == 1 and calls.count(9) == 2  # both eager, 16 never retried
    (out,) = wrapped(torch.ones(3, 5))
    out += 1  # a fresh tensor: the graph's static output is not handed out
    (again,) = wrapped(torch.ones(3, 5))
    assert torch.equal(again, torch.full((3, 5), 3.0))
