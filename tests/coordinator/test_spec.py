"""Admission checks of a GenerateRequest (spec_from_proto), without a server."""

from __future__ import annotations

import pytest
from ditserve.common.status import ServiceError, StatusCode
from ditserve.config import CoordinatorConfig
from ditserve.coordinator.protocol import spec_from_proto
from ditserve.coordinator.spec import MAX_GUIDANCE_SCALE
from ditserve.model import DiTConfig
from ditserve_client.proto.dit.v1 import coordinator_pb2 as pb

MODEL = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                  num_heads=2, num_classes=10)


def _admit(scale: float):
    message = pb.GenerateRequest(class_labels=[1], guidance_scale=scale, skip_images=True)
    return spec_from_proto(message, MODEL, CoordinatorConfig(), has_decoder=False)


@pytest.mark.parametrize("scale", [1e38, MAX_GUIDANCE_SCALE * 1.001, float("inf"), 0.5])
def test_guidance_outside_its_bounds_is_refused_naming_them(scale):
    with pytest.raises(ServiceError) as refused:
        _admit(scale)
    assert refused.value.code is StatusCode.INVALID_ARGUMENT
    assert refused.value.message.startswith("guidance_scale: must be a number from 1 to 10000")


@pytest.mark.parametrize("scale", [1.0, 4.0, MAX_GUIDANCE_SCALE])
def test_guidance_within_its_bounds_is_admitted(scale):
    assert _admit(scale).guidance_scale == scale


def _admit_mode(**fields):
    message = pb.GenerateRequest(class_labels=[1], skip_images=True, num_steps=20, **fields)
    config = CoordinatorConfig(default_async_warmup_steps=5)
    return spec_from_proto(message, MODEL, config, has_decoder=False)


def test_mode_defaults_to_exact_without_warmup():
    spec = _admit_mode()
    assert (spec.mode, spec.async_warmup_steps) == ("exact", 0)


@pytest.mark.parametrize("fields, warmup", [({}, 5), ({"async_warmup_steps": 0}, 0),
                                            ({"async_warmup_steps": 20}, 20)])
def test_async_mode_takes_its_warmup_or_the_default(fields, warmup):
    spec = _admit_mode(mode=pb.GENERATION_MODE_ASYNC, **fields)
    assert (spec.mode, spec.async_warmup_steps) == ("async", warmup)


def test_the_default_warmup_is_capped_at_the_steps():
    message = pb.GenerateRequest(class_labels=[1], skip_images=True, num_steps=3,
                                 mode=pb.GENERATION_MODE_ASYNC)
    spec = spec_from_proto(message, MODEL, CoordinatorConfig(default_async_warmup_steps=5),
                           has_decoder=False)
    assert spec.async_warmup_steps == 3


@pytest.mark.parametrize("fields, start", [
    ({"mode": 7}, "mode: unknown value 7; choose GENERATION_MODE_EXACT"),
    ({"mode": pb.GENERATION_MODE_ASYNC, "async_warmup_steps": 21},
     "async_warmup_steps: 21 is outside 0..20"),
    ({"mode": pb.GENERATION_MODE_ASYNC, "async_warmup_steps": -1},
     "async_warmup_steps: -1 is outside 0..20"),
    ({"async_warmup_steps": 2}, "async_warmup_steps: only an async request")])
def test_bad_modes_and_warmups_are_refused_naming_the_field(fields, start):
    with pytest.raises(ServiceError) as refused:
        _admit_mode(**fields)
    assert refused.value.code is StatusCode.INVALID_ARGUMENT
    assert refused.value.message.startswith(start)
