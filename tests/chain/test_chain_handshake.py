"""check_chain: one consistent chain passes; every kind of mismatch is FAILED_PRECONDITION
naming the stage and what differs."""

from __future__ import annotations

import dataclasses

import pytest
from ditserve.chain import check_chain
from ditserve.common.status import ServiceError, StatusCode
from ditserve.stage.runner import StageDescription


def _chain(ranges=((0, 2), (2, 3), (3, 4)), wire="BF16") -> list[StageDescription]:
    return [StageDescription(stage_index=i, num_stages=len(ranges), block_start=a, block_end=b,
                             depth=4, model_name="DiT-Tiny/2", model_config_json='{"d": 4}',
                             weight_hash="abc", wire_dtype=wire, address=f"h:{50 + i}")
            for i, (a, b) in enumerate(ranges)]


def test_consistent_chain_passes():
    check_chain(_chain())
    check_chain(_chain(((0, 4),), wire="FP32"), expected_wire_dtype="fp32")


def _with(stage: int, **changes) -> list[StageDescription]:
    chain = _chain()
    chain[stage] = dataclasses.replace(chain[stage], **changes)
    return chain


@pytest.mark.parametrize(("chain", "words"), [
    (_chain(((0, 2), (3, 4))), r"stage 1 \(h:51\): blocks 3:4 leave a gap"),
    (_chain(((0, 2), (1, 4))), r"stage 1 \(h:51\): blocks 1:4 leave an overlap"),
    (_chain(((0, 2), (2, 3))), r"stage 1 .*ends at block 3, the model has 4"),
    (_chain(((1, 4),)), r"stage 0 .*blocks 1:4 leave a gap"),
    (_with(2, weight_hash="xyz"), r"stage 2 \(h:52\): weight hash 'xyz' differs"),
    (_with(1, model_config_json="{}"), r"stage 1 .*model config"),
    (_with(2, wire_dtype="FP16"), r"stage 2 .*wire dtype FP16 differs from BF16"),
    (_with(1, stage_index=2), r"stage 2 .*reports index 2 at position 1"),
    (_with(0, num_stages=2), r"stage 0 .*configured for 2 stages, the chain has 3"),
    (_with(1, serving=False), r"stage 1 .*not serving"),
])
def test_mismatch_is_failed_precondition_naming_the_stage(chain, words):
    with pytest.raises(ServiceError, match=words) as caught:
        check_chain(chain)
    assert caught.value.code is StatusCode.FAILED_PRECONDITION


def test_expected_wire_dtype_is_enforced():
    with pytest.raises(ServiceError, match=r"stage 0 .*wire dtype BF16 differs from FP32"):
        check_chain(_chain(), expected_wire_dtype="FP32")


def test_empty_chain_fails():
    with pytest.raises(ServiceError, match="no stages"):
        check_chain([])
