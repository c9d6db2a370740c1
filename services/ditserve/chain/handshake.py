"""The coordinator's end-to-end check of a chain before serving (docs/ARCHITECTURE.md §5).

Every stage must serve the same model (config and weight hash) with the same wire dtype,
the stages must come in index order, and their block ranges must tile 0..depth exactly
once. Any difference is FAILED_PRECONDITION naming the stage and what differs.
"""

from __future__ import annotations

from collections.abc import Sequence

from ditserve.common.status import ServiceError, StatusCode

from .base import StageDescription


def _mismatch(stage: StageDescription, what: str) -> ServiceError:
    where = f"stage {stage.stage_index}" + (f" ({stage.address})" if stage.address else "")
    return ServiceError(StatusCode.FAILED_PRECONDITION, f"{where}: {what}")


def check_chain(stages: Sequence[StageDescription], expected_wire_dtype: str | None = None,
                require_serving: bool = True) -> None:
    """Raises ServiceError(FAILED_PRECONDITION) unless `stages` form one consistent chain
    (of serving stages, unless `require_serving` is False: a chain still starting)."""
    if not stages:
        raise ServiceError(StatusCode.FAILED_PRECONDITION, "the chain reported no stages")
    first = stages[0]
    for position, stage in enumerate(stages):
        _check_identity(stage, first, position, len(stages), expected_wire_dtype)
        if require_serving and not stage.serving:
            raise _mismatch(stage, "is not serving (weights not loaded or not warmed up)")
    _check_tiling(stages)


def _check_identity(stage: StageDescription, first: StageDescription, position: int,
                    count: int, expected_wire_dtype: str | None) -> None:
    if stage.stage_index != position:
        raise _mismatch(stage, f"reports index {stage.stage_index} at position {position} "
                               "of the chain")
    if stage.num_stages != count:
        raise _mismatch(stage, f"was configured for {stage.num_stages} stages, the chain "
                               f"has {count}")
    for name, label in (("model_config_json", "model config"), ("weight_hash", "weight hash"),
                        ("depth", "model depth")):
        if getattr(stage, name) != getattr(first, name):
            raise _mismatch(stage, f"{label} {getattr(stage, name)!r} differs from stage 0's "
                                   f"{getattr(first, name)!r}")
    wanted = expected_wire_dtype or first.wire_dtype
    if stage.wire_dtype.upper() != wanted.upper():
        raise _mismatch(stage, f"wire dtype {stage.wire_dtype} differs from {wanted.upper()}")


def _check_tiling(stages: Sequence[StageDescription]) -> None:
    expected_start = 0
    for stage in stages:
        if stage.block_start != expected_start:
            gap = "a gap" if stage.block_start > expected_start else "an overlap"
            raise _mismatch(stage, f"blocks {stage.block_start}:{stage.block_end} leave {gap}: "
                                   f"the previous stage ends at block {expected_start}")
        if stage.block_end <= stage.block_start:
            raise _mismatch(stage, f"empty block range {stage.block_start}:{stage.block_end}")
        expected_start = stage.block_end
    last = stages[-1]
    if expected_start != last.depth:
        raise _mismatch(last, f"the chain ends at block {expected_start}, the model has "
                              f"{last.depth} blocks")
