"""The typed pipeline config: every field checked against its type at load, and the
Literal aliases agreeing with what they name (samplers, wire dtypes, dit.v1 enums)."""

from __future__ import annotations

import re
from typing import get_args

import pytest
from ditserve.common.status import UserError
from ditserve.config import (
    ConfigError,
    GenerationMode,
    GuidanceChannels,
    PreviewMode,
    SamplerName,
    WireDtype,
    config_from_dict,
)
from ditserve.coordinator.protocol import CHANNELS, MODES, PREVIEWS, SAMPLER_NAMES
from ditserve.sampling import SAMPLERS
from ditserve.sampling.guidance import GUIDANCE_CHANNELS
from ditserve.wire import WIRE_DTYPE_NAMES

STAGES = {"stages": [{"address": "127.0.0.1:50052"}]}


def test_literal_aliases_name_exactly_what_exists():
    assert set(get_args(SamplerName)) == set(SAMPLERS) == set(SAMPLER_NAMES.values())
    assert set(get_args(WireDtype)) == set(WIRE_DTYPE_NAMES)
    assert set(get_args(PreviewMode)) == set(PREVIEWS.values())
    assert set(get_args(GuidanceChannels)) == set(CHANNELS.values()) == set(GUIDANCE_CHANNELS)
    assert set(get_args(GenerationMode)) == set(MODES.values())


@pytest.mark.parametrize(("section", "message"), [
    ({"wire_dtype": "bf8"}, "wire_dtype must be one of 'bf16', 'fp16', 'fp32', got 'bf8'"),
    ({"transport": "rdma"}, "transport must be one of 'auto', 'grpc', 'shm', got 'rdma'"),
    ({"coordinator": {"default_sampler": "euler"}},
     "coordinator.default_sampler must be one of 'ddpm', 'ddim', 'dpm-solver++'"),
    ({"coordinator": {"max_queued_requests": "64"}},
     "coordinator.max_queued_requests must be an integer, got '64'"),
    ({"coordinator": {"max_receive_bytes": True}}, "coordinator.max_receive_bytes must be an integer"),
    ({"model": {"name": 3}}, "model.name must be a string or null, got 3"),
    ({"coordinator": {"async_x0_trend": 1.5}},
     "coordinator.async_x0_trend must be in 0..1, got 1.5"),
    ({"coordinator": {"default_async_warmup_steps": -1}},
     "coordinator.default_async_warmup_steps must be >= 0, got -1"),
    ({"stages": [{"address": "h:1", "device": None}]}, "stages[0].device must be a string"),
])
def test_a_value_of_the_wrong_type_is_a_config_error_naming_the_key(section, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        config_from_dict({**STAGES, **section})
    assert isinstance(caught.value, UserError)


def test_numbers_may_be_written_as_integers():
    config = config_from_dict({**STAGES, "coordinator": {"default_guidance_scale": 4}})
    assert config.coordinator.default_guidance_scale == 4
