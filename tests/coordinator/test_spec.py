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
