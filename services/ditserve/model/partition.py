"""Which blocks a pipeline stage runs: one small function, applied from the outside."""

from __future__ import annotations

from ditserve.common.status import UserError


class PartitionError(UserError, ValueError):
    """A stage index, stage count or block range that does not fit the model."""


def stage_block_range(depth: int, stage: int, stages: int) -> tuple[int, int]:
    """Blocks [start, end) of stage `stage` of `stages`: equal counts, the first stages
    taking one more block when depth does not divide evenly (as vLLM's get_pp_indices)."""
    if not 1 <= stages <= depth:
        raise PartitionError(f"stages must be between 1 and the model depth {depth}, got {stages}")
    if not 0 <= stage < stages:
        raise PartitionError(f"stage must be between 0 and {stages - 1}, got {stage}")
    base, extra = divmod(depth, stages)
    start = stage * base + min(stage, extra)
    return start, start + base + (1 if stage < extra else 0)


def parse_block_range(text: str, depth: int) -> tuple[int, int]:
    """'A:B' → (A, B), checked against the model depth."""
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise PartitionError(f"block range must look like START:END, got {text!r}") from None
    if not 0 <= start < end <= depth:
        raise PartitionError(f"block range {text!r} must satisfy 0 <= START < END <= depth {depth}")
    return start, end


def split_blocks(depth: int, counts: list[int]) -> list[tuple[int, int]]:
    """Explicit uneven split: block counts per stage → ranges (e.g. [10, 9, 9])."""
    if sum(counts) != depth or min(counts) < 1:
        raise PartitionError(f"block counts {counts} must be positive and sum to depth {depth}")
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges
