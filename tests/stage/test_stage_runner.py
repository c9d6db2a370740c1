"""StageRunner: validation of every input with a message naming it, and the wire cast."""

from __future__ import annotations

import asyncio

import pytest
import torch
from ditserve.stage import StageRunner
from ditserve.wire import WireError
from numerics import FORWARD_BF16_WIRE, assert_scaled_close


@pytest.fixture(scope="module")
def first(tiny_model):
    runner = StageRunner(tiny_model, (0, 2), 0, 2, "bf16", max_batch_size=4)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def last(tiny_model):
    runner = StageRunner(tiny_model, (2, 4), 1, 2, "bf16", max_batch_size=4)
    yield runner
    runner.close()


def _good(n=2):
    return {"x": torch.randn(n, 4, 8, 8), "t": torch.tensor([0, 999] * (n // 2)),
            "y": torch.tensor([0, 10] * (n // 2))}


@pytest.mark.parametrize(("change", "words"), [
    ({"x": torch.randn(2, 3, 8, 8)}, r"x: shape \[2, 3, 8, 8\], this model needs \[2, 4, 8, 8\]"),
    ({"x": torch.randn(6, 4, 8, 8)}, "batch of 6 rows exceeds this stage's max_batch_size 4"),
    ({"t": torch.tensor([0, 1000])}, r"timesteps must lie in \[0, 1000\), got 1000"),
    ({"t": torch.tensor([float("nan"), 1.0])}, "timesteps must lie"),
    ({"t": torch.tensor([1, 2], dtype=torch.int32)}, "t: datatype INT32, expected INT64 or FP32"),
    ({"y": torch.tensor([-1, 0])}, "class labels must lie"),
    ({"y": torch.tensor([0])}, r"y: shape \[1\], this model needs \[2\]"),
    ({"x": torch.full((2, 4, 8, 8), float("inf"))}, "NaN or infinity"),
    ({"h": torch.zeros(1)}, "expected tensors x, t, y"),
])
def test_first_stage_rejects_bad_input(first, change, words):
    with pytest.raises(WireError, match=words):
        first.validate({**_good(), **change})


def test_later_stage_checks_wire_dtype_and_shape(last):
    h, c = torch.zeros(2, 16, 64, dtype=torch.bfloat16), torch.zeros(2, 64, dtype=torch.bfloat16)
    last.validate({"h": h, "c": c})
    with pytest.raises(WireError, match="h: datatype FP32, expected BF16"):
        last.validate({"h": h.float(), "c": c})
    with pytest.raises(WireError, match=r"h: shape \[2, 15, 64\], this model needs \[2, 16, 64\]"):
        last.validate({"h": h[:, :15], "c": c})
    with pytest.raises(WireError, match=r"c: shape \[2, 32\]"):
        last.validate({"h": h, "c": c[:, :32]})


def test_first_stage_sends_wire_dtype_last_returns_fp32(first, last, tiny_model):
    good = _good()
    inputs = first.validate(good)
    outputs, seconds = asyncio.run(first.submit(inputs))
    assert [name for name, _ in outputs] == ["h", "c"] and seconds > 0
    assert all(t.dtype == torch.bfloat16 for _, t in outputs)
    (name, out), = last.compute(last.validate(dict(outputs)))
    assert name == "out" and out.dtype == torch.float32 and out.shape == (2, 8, 8, 8)
    assert_scaled_close(out, tiny_model(**good), FORWARD_BF16_WIRE)  # bf16 wire
    assert first.describe().wire_dtype == "BF16" and first.max_payload_bytes() > 0


def test_compute_runs_on_one_dedicated_thread(first):
    import threading

    seen = set()
    hook = first.model.blocks["0"].register_forward_pre_hook(
        lambda *_: seen.add(threading.current_thread().name))
    try:
        asyncio.run(first.submit(first.validate(_good())))
        asyncio.run(first.submit(first.validate(_good())))
    finally:
        hook.remove()
    assert len(seen) == 1 and next(iter(seen)).startswith("compute")


def test_a_runner_over_the_whole_model_runs_a_view_of_its_own_slice(tiny_model):
    runner = StageRunner(tiny_model, (1, 3), 1, 3, "fp32")
    try:
        assert list(runner.model.blocks) == ["1", "2"]
        assert runner.model.blocks["1"] is tiny_model.blocks["1"]  # shared, not copied
        assert not runner.model.has_embedders and not runner.model.has_final_layer
        h = torch.randn(2, 16, 64)
        c = torch.randn(2, 64)
        (_, h_out), _ = runner.compute({"h": h, "c": c})
        expected = tiny_model.blocks["2"](tiny_model.blocks["1"](h, c), c)
        torch.testing.assert_close(h_out, expected, rtol=0, atol=0)
    finally:
        runner.close()


def test_a_stage_process_opens_its_checkpoint_once(tiny_checkpoint, monkeypatch):
    """The stage command reads the depth and the server loads the slice from one reader."""
    import argparse

    from ditserve.entrypoints.stage import _from_flags
    from ditserve.model import checkpoint
    from ditserve.stage.server import _load

    opened: list[str] = []
    real = checkpoint.safe_open
    monkeypatch.setattr(checkpoint, "safe_open",
                        lambda path, *a, **k: opened.append(str(path)) or real(path, *a, **k))
    args = argparse.Namespace(checkpoint=str(tiny_checkpoint), stage=1, stages=2, listen="l:1",
                              blocks=None, model=None, next=None, device=None, wire_dtype=None,
                              max_batch=None, metrics_port=None, tls_ca=None, tls_cert=None,
                              tls_key=None, health_listen=None, insecure_plaintext=False,
                              relay=False, transport=None, latent_size=32)
    runner = _load(_from_flags(args))
    runner.close()
    assert opened == [str(tiny_checkpoint)] and (runner.block_start, runner.block_end) == (2, 4)


# ---- compute dtype and CUDA graphs ---------------------------------------------------------

def test_cpu_runners_never_use_cuda_graphs(tiny_model):
    runner = StageRunner(tiny_model, (0, 4), cuda_graphs=True)
    assert runner.graphs is None  # graphs are for CUDA devices only
    runner.close()


@pytest.mark.parametrize("blocks", [(0, 2), (2, 4), (0, 4)])
def test_zero_padding_rows_leaves_the_real_rows_unchanged(tiny_model, blocks):
    """The premise of padding a microbatch up to a captured graph's size."""
    from ditserve.model.graphs import pad_rows
    from numerics import FORWARD_FP32

    runner = StageRunner(tiny_model, blocks, 0 if blocks[0] == 0 else 1, 2, "fp32")
    cfg = tiny_model.config
    if blocks[0] == 0:
        args = (torch.randn(3, 4, 8, 8), torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 5, 10]))
    else:
        args = (torch.randn(3, cfg.num_tokens, cfg.hidden_size), torch.randn(3, cfg.hidden_size))
    with torch.inference_mode():
        alone = runner._forward(*args)
        padded = runner._forward(*(pad_rows(a, 8) for a in args))
    for a, p in zip(alone, padded, strict=True):
        assert_scaled_close(p[:3], a, FORWARD_FP32, "padded rows")
    runner.close()


def test_a_bf16_model_computes_in_bf16_near_the_fp32_one(tiny_model):
    """What a CUDA stage does (bf16 weights, SDPA in bf16), here on the CPU: every stage
    computes in its weights' dtype and the last one returns FP32 close to the fp32 model.
    Bound: weights and activations each round to bf16 (u = 2^-9) at every layer; through
    the tiny model's 4 blocks that moves the output by a few percent of its scale at most
    (seen <= 9e-3 over 5 seeds); a wrong dtype path (fp32 weights fed bf16 tokens) raises instead."""
    import copy

    model16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    runner16 = StageRunner(model16, (0, 4), wire_dtype="bf16")
    runner32 = StageRunner(tiny_model, (0, 4), wire_dtype="fp32")
    inputs = _good(4)
    (_, out16), = runner16.compute(inputs)
    (_, out32), = runner32.compute(inputs)
    assert runner16.describe().device == "cpu/bfloat16" and out16.dtype == torch.float32
    assert_scaled_close(out16, out32, 0.05, "bf16 vs fp32 compute")
    runner16.close()
    runner32.close()


@pytest.mark.parametrize(("configured", "flags", "expected"), [
    (None, [], True), (False, [], False), (False, ["--cuda-graphs"], True),
    (True, ["--no-cuda-graphs"], False)])
def test_cuda_graphs_come_from_the_config_and_a_flag_overrides_it(tiny_checkpoint, tmp_path,
                                                                  configured, flags, expected):
    import argparse

    import yaml
    from ditserve.entrypoints.stage import _from_config, _from_flags, add_arguments

    stage = {"address": "127.0.0.1:1"} | ({} if configured is None else {"cuda_graphs": configured})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"model": {"checkpoint": str(tiny_checkpoint)},
                                    "stages": [stage]}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = _from_config(parser.parse_args(["--config", str(path), "--stage", "0", *flags]),
                           env=argparse.Namespace(stage_index=None))
    assert options.cuda_graphs is expected
    if configured is None:  # the flags-only form: on unless --no-cuda-graphs
        for given, want in (([], True), (["--no-cuda-graphs"], False)):
            args = parser.parse_args(["--checkpoint", str(tiny_checkpoint), "--stage", "0",
                                      "--stages", "1", "--listen", "127.0.0.1:1", *given])
            assert _from_flags(args).cuda_graphs is want


def test_a_config_refuses_a_cuda_graphs_that_is_not_a_boolean(tmp_path):
    from ditserve.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="cuda_graphs"):
        config_from_dict({"stages": [{"address": "127.0.0.1:1", "cuda_graphs": "sometimes"}]})


def test_outputs_for_a_handoff_are_the_same_numbers(first):
    inputs = first.validate(_good())
    on_host, on_device = first.compute(inputs), first.compute(inputs, on_device=True)
    for (name, a), (other, b) in zip(on_host, on_device, strict=True):
        assert name == other and torch.equal(a, b) and b.device == first.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_outputs_stay_on_the_device_for_a_handoff_else_come_pinned(tiny_checkpoint):
    runner = StageRunner.from_checkpoint(tiny_checkpoint, (0, 2), device="cuda",
                                         num_stages=2, cuda_graphs=False)
    inputs = runner.validate(_good())
    on_host, on_device = runner.compute(inputs), runner.compute(inputs, on_device=True)
    for (_, a), (_, b) in zip(on_host, on_device, strict=True):
        assert a.device.type == "cpu" and a.is_pinned()  # the one staging path
        assert b.is_cuda and torch.equal(a, b.cpu())
