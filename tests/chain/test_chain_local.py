"""LocalChain: N emulated stages equal the monolithic forward; bad input is rejected."""

from __future__ import annotations

import asyncio

import pytest
import torch
from ditserve.chain import check_chain
from ditserve.chain.local import LocalChain
from ditserve.common.status import ServiceError, StatusCode
from numerics import FORWARD_BF16_WIRE, FORWARD_FP32, assert_scaled_close


def _inputs(config, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, config.num_classes + 1, (n,), generator=gen)
    return x, t, y


async def _forward(chain, *inputs):
    try:
        out, seconds = await chain.forward(*inputs)
    finally:
        await chain.close()
    assert len(seconds) == len(chain.runners) and all(s > 0 for s in seconds)
    return out


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_fp32_wire_equals_monolithic_forward(tiny_model, stages):
    x, t, y = _inputs(tiny_model.config)
    out = asyncio.run(_forward(LocalChain.from_model(tiny_model, stages, "fp32"), x, t, y))
    assert out.dtype == torch.float32
    assert_scaled_close(out, tiny_model(x, t, y), FORWARD_FP32)


def test_bf16_wire_from_checkpoint_within_tolerance(tiny_checkpoint, tiny_model):
    x, t, y = _inputs(tiny_model.config)
    chain = LocalChain.from_checkpoint(str(tiny_checkpoint), 2, "bf16")
    check_chain(asyncio.run(chain.describe()), expected_wire_dtype="BF16")
    out = asyncio.run(_forward(chain, x, t, y))
    reference = tiny_model(x, t, y)
    assert not torch.equal(out, reference)  # the bf16 cast is really applied
    assert_scaled_close(out, reference, FORWARD_BF16_WIRE)


def test_bad_label_is_invalid_argument(tiny_model):
    x, t, y = _inputs(tiny_model.config)
    y[1] = 11  # 10 classes + null = 11 rows: 11 is out of range
    with pytest.raises(ServiceError, match=r"y: class labels must lie in \[0, 10\]") as caught:
        asyncio.run(_forward(LocalChain.from_model(tiny_model, 2), x, t, y))
    assert caught.value.code is StatusCode.INVALID_ARGUMENT


def test_from_checkpoint_opens_the_file_once_for_every_stage(tiny_checkpoint, monkeypatch):
    opened = _count_opens(monkeypatch)
    chain = LocalChain.from_checkpoint(str(tiny_checkpoint), 3, "fp32")
    asyncio.run(chain.close())
    assert opened == [str(tiny_checkpoint)]


def _count_opens(monkeypatch) -> list[str]:
    """Records every safetensors file the checkpoint readers open."""
    from ditserve.model import checkpoint

    opened: list[str] = []
    real = checkpoint.safe_open

    def counting(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", counting)
    return opened
